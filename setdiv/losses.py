"""Training objective (SPEC §4): triplet ranking loss, MMD and diversity regularisers.

Shape legend: N images, M captions (image-major: caption c belongs to image c // (M/N)),
K / L set sizes, D embedding width.

`SetRetrievalLoss` returns named, already weighted terms (`i2t_loss`, `t2i_loss`, `mmd_loss`,
`div_loss`); the caller sums them for the total.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setdiv.config import LossConfig
from setdiv.distributed import all_gather_with_grad, rank_and_world
from setdiv.model.set_modules import SetOutput

__all__ = [
    "SetRetrievalLoss",
    "build_loss",
    "diversity_loss",
    "mmd_loss",
    "positive_mask",
    "similarity_moments",
    "similarity_spread",
    "triplet_loss",
]


def positive_mask(num_images: int, num_captions: int, device: torch.device | None = None) -> Tensor:
    """(N,M) bool: caption c is a positive of image c // (M/N) (image-major batches)."""
    if num_captions % num_images:
        raise ValueError(f"{num_captions} captions do not split evenly over {num_images} images")
    per_image = num_captions // num_images
    owner_M = torch.arange(num_captions, device=device) // per_image
    return owner_M[None, :] == torch.arange(num_images, device=device)[:, None]


def _row_hinges(sims_QC: Tensor, pos_QC: Tensor, margin: float, hardest: bool) -> Tensor:
    """Hinge per (query, positive) pair -> (P,): against the hardest or the mean negative."""
    q_idx, c_idx = pos_QC.nonzero(as_tuple=True)
    pos_sims_P = sims_QC[q_idx, c_idx]
    if hardest:
        hardest_Q = sims_QC.masked_fill(pos_QC, float("-inf")).amax(dim=1)
        return (margin + hardest_Q[q_idx] - pos_sims_P).clamp_min(0)
    hinge_PC = (margin + sims_QC[q_idx] - pos_sims_P[:, None]).clamp_min(0)
    neg_PC = ~pos_QC[q_idx]
    return (hinge_PC * neg_PC).sum(dim=1) / neg_PC.sum(dim=1).clamp_min(1)


def triplet_loss(
    sims_NM: Tensor, pos_NM: Tensor, margin: float, hardest: bool = True, reduction: str = "mean"
) -> dict[str, Tensor]:
    """VSE++ triplet loss over an (N,M) similarity matrix with an (N,M) positive mask.

    i2t: every (image, positive caption) pair against the image's hardest (or mean) negative
    caption; t2i: every caption against its hardest (or mean) negative image.
    """
    num_pairs = int(pos_NM.sum())
    return _triplet_terms(sims_NM, pos_NM, sims_NM, pos_NM, margin, hardest, reduction, num_pairs)


def _triplet_terms(
    rows_nM: Tensor,
    pos_nM: Tensor,
    cols_Nm: Tensor,
    pos_Nm: Tensor,
    margin: float,
    hardest: bool,
    reduction: str,
    num_pairs: int,
) -> dict[str, Tensor]:
    """A share of the triplet loss: i2t over the image rows (n,M) against all captions, t2i
    over the caption columns (N,m) against all images. `mean` divides by `num_pairs`, the
    positive pairs of the whole (N,M) batch, so the shares sum to the whole loss."""
    i2t = _row_hinges(rows_nM, pos_nM, margin, hardest).sum()
    t2i = _row_hinges(cols_Nm.T, pos_Nm.T, margin, hardest).sum()
    if reduction == "mean":
        i2t, t2i = i2t / num_pairs, t2i / num_pairs
    return {"i2t_loss": i2t, "t2i_loss": t2i}


def _kernel_sum(a_PD: Tensor, b_QD: Tensor) -> Tensor:
    """sum_ij exp(-0.5 ||a_i - b_j||) (distance not squared)."""
    # ||a - b|| from Gram entries; the clamp keeps sqrt's gradient finite at distance 0.
    d2 = (a_PD.pow(2).sum(1)[:, None] + b_QD.pow(2).sum(1)[None, :] - 2 * a_PD @ b_QD.T).clamp_min(
        1e-12
    )
    return torch.exp(-0.5 * d2.sqrt()).sum()


def mmd_loss(x_PD: Tensor, y_QD: Tensor) -> Tensor:
    """Biased MMD estimate between element clouds x (P,D) and y (Q,D), k = exp(-0.5 ||x - y||)."""
    return _mmd_rows(x_PD, x_PD, y_QD, y_QD)


def _mmd_rows(x_pD: Tensor, x_PD: Tensor, y_qD: Tensor, y_QD: Tensor) -> Tensor:
    """A share of `mmd_loss(x_PD, y_QD)`: the rows x_pD, y_qD of the three kernel sums (all
    rows: the whole estimate)."""
    P, Q = x_PD.shape[0], y_QD.shape[0]
    return (
        _kernel_sum(x_pD, x_PD) / P**2
        + _kernel_sum(y_qD, y_QD) / Q**2
        - 2 * _kernel_sum(x_pD, y_QD) / (P * Q)
    )


def _diversity_per_sample(slots_BKD: Tensor) -> Tensor:
    B, K, _ = slots_BKD.shape
    if K < 2:
        return slots_BKD.new_zeros(B)
    r_BKD = F.normalize(slots_BKD, dim=-1)
    d2_BKK = (2 - 2 * r_BKD @ r_BKD.transpose(1, 2)).clamp_min(0)
    i, j = torch.triu_indices(K, K, offset=1, device=slots_BKD.device)
    return torch.exp(-2 * d2_BKK[:, i, j]).mean(dim=1)


def diversity_loss(slots_BKD: Tensor) -> Tensor:
    """Mean over samples of 2/(K(K-1)) sum_{i<j} exp(-2 ||r_i - r_j||^2), r = l2norm(slots)."""
    return _diversity_per_sample(slots_BKD).mean()


def similarity_moments(sims: Tensor) -> Tensor:
    """A block of similarities (any shape) -> (4,) float64 [count, sum, centred sum of squares,
    count * mean^2]: summed over the blocks of a matrix (ranks' rows), `similarity_spread`
    gives the whole matrix's standard deviation without cancellation in the sum of squares."""
    x = sims.detach().double().reshape(-1)
    n = float(x.numel())
    mean = x.mean() if n else x.new_zeros(())
    centred = ((x - mean) ** 2).sum()
    return torch.stack([x.new_tensor(n), x.sum(), centred, n * mean**2])


def similarity_spread(moments: Tensor) -> float:
    """(4,) moments of `similarity_moments`, summed over blocks -> the population standard
    deviation of all the similarities (0.0 when there are none). A collapsing model shows it
    near 0: every image scores every caption alike."""
    n, total, centred, n_mean_sq = (float(v) for v in moments)
    if n <= 0:
        return 0.0
    squares = centred + n_mean_sq - total * total / n
    return max(squares / n, 0.0) ** 0.5


def _wide(t: Tensor) -> Tensor:
    """16-bit tensors in float32 for the regularisers; float32/64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class SetRetrievalLoss(nn.Module):
    """L = L_i2t + L_t2i + w_mmd * MMD + w_div * Div, as separately named terms.

    Under a process group the global batch is the concatenation of the ranks' batches: sets
    are all-gathered with gradient, each rank computes its image rows (i2t, hardest negative
    over ALL captions) and its caption columns (t2i, over ALL images), and every term is this
    rank's share, normalised by global counts. The shares sum over ranks to the whole-batch
    loss, and after the gather's backward each rank holds the whole-batch gradient for its own
    samples. (A data-parallel engine averages parameter gradients over ranks, so the caller
    back-propagates world_size x the local loss.)

    After each forward, `sim_moments` holds `similarity_moments` of this rank's rows of the
    similarity matrix: summed over ranks they describe the whole batch's matrix.
    """

    def __init__(self, cfg: LossConfig, similarity: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.similarity = similarity
        self.sim_moments: Tensor | None = None

    def forward(self, image: SetOutput, text: SetOutput, epoch: int = 0) -> dict[str, Tensor]:
        """Local image sets (n,K,D), caption sets (5n,L,D), image-major -> this rank's share
        of each named term (world size 1: the whole loss)."""
        cfg = self.cfg
        rank, world = rank_and_world()
        img_all, txt_all = all_gather_with_grad(image.embeds), all_gather_with_grad(text.embeds)
        n, m = image.embeds.shape[0], text.embeds.shape[0]
        N, M = img_all.shape[0], txt_all.shape[0]
        pos_NM = positive_mask(N, M, image.embeds.device)
        rows_nM = self.similarity(image.embeds, txt_all)
        cols_Nm = rows_nM if world == 1 else self.similarity(img_all, text.embeds)
        self.sim_moments = similarity_moments(rows_nM)
        hardest = cfg.hardest_negatives and epoch >= cfg.mean_negative_epochs
        terms = _triplet_terms(
            rows_nM,
            pos_NM[rank * n : (rank + 1) * n],
            cols_Nm,
            pos_NM[:, rank * m : (rank + 1) * m],
            cfg.margin,
            hardest,
            cfg.reduction,
            num_pairs=M,  # image-major: every caption is one positive pair
        )
        if cfg.mmd_weight:
            D = image.embeds.shape[-1]
            x, y = _wide(image.embeds.reshape(-1, D)), _wide(text.embeds.reshape(-1, D))
            xa, ya = _wide(img_all.reshape(-1, D)), _wide(txt_all.reshape(-1, D))
            terms["mmd_loss"] = cfg.mmd_weight * _mmd_rows(x, xa, y, ya)
        if cfg.div_weight:
            div = _diversity_per_sample(_wide(image.slots)).sum() / N
            div = div + _diversity_per_sample(_wide(text.slots)).sum() / M
            terms["div_loss"] = cfg.div_weight * div
        return terms


def build_loss(cfg: LossConfig, similarity: Callable[[Tensor, Tensor], Tensor]) -> SetRetrievalLoss:
    """The training objective with the given (configured) set similarity."""
    return SetRetrievalLoss(cfg, similarity)
