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
from setdiv.model.set_modules import SetOutput

__all__ = [
    "SetRetrievalLoss",
    "build_loss",
    "diversity_loss",
    "mmd_loss",
    "positive_mask",
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
    i2t_P = _row_hinges(sims_NM, pos_NM, margin, hardest)
    t2i_P = _row_hinges(sims_NM.T, pos_NM.T, margin, hardest)
    reduce = torch.mean if reduction == "mean" else torch.sum
    return {"i2t_loss": reduce(i2t_P), "t2i_loss": reduce(t2i_P)}


def mmd_loss(x_PD: Tensor, y_QD: Tensor) -> Tensor:
    """Biased MMD estimate between element clouds x (P,D) and y (Q,D), k = exp(-0.5 ||x - y||)."""

    def k_mean(a: Tensor, b: Tensor) -> Tensor:
        # ||a - b|| from Gram entries; the clamp keeps sqrt's gradient finite at distance 0.
        d2 = (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(1e-12)
        return torch.exp(-0.5 * d2.sqrt()).mean()

    return k_mean(x_PD, x_PD) + k_mean(y_QD, y_QD) - 2 * k_mean(x_PD, y_QD)


def diversity_loss(slots_BKD: Tensor) -> Tensor:
    """Mean over samples of 2/(K(K-1)) sum_{i<j} exp(-2 ||r_i - r_j||^2), r = l2norm(slots)."""
    B, K, _ = slots_BKD.shape
    if K < 2:
        return slots_BKD.new_zeros(())
    r_BKD = F.normalize(slots_BKD, dim=-1)
    d2_BKK = (2 - 2 * r_BKD @ r_BKD.transpose(1, 2)).clamp_min(0)
    i, j = torch.triu_indices(K, K, offset=1, device=slots_BKD.device)
    return torch.exp(-2 * d2_BKK[:, i, j]).mean()


class SetRetrievalLoss(nn.Module):
    """L = L_i2t + L_t2i + w_mmd * MMD + w_div * Div, as separately named terms."""

    def __init__(self, cfg: LossConfig, similarity: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.cfg = cfg
        self.similarity = similarity

    def forward(self, image: SetOutput, text: SetOutput, epoch: int = 0) -> dict[str, Tensor]:
        """image sets (N,K,D), text sets (M,L,D), M = 5N image-major -> named scalar terms."""
        cfg = self.cfg
        sims_NM = self.similarity(image.embeds, text.embeds)
        pos_NM = positive_mask(sims_NM.shape[0], sims_NM.shape[1], sims_NM.device)
        hardest = cfg.hardest_negatives and epoch >= cfg.mean_negative_epochs
        terms = triplet_loss(sims_NM, pos_NM, cfg.margin, hardest, cfg.reduction)
        if cfg.mmd_weight:
            D = image.embeds.shape[-1]
            x, y = image.embeds.reshape(-1, D).float(), text.embeds.reshape(-1, D).float()
            terms["mmd_loss"] = cfg.mmd_weight * mmd_loss(x, y)
        if cfg.div_weight:
            div = diversity_loss(image.slots.float()) + diversity_loss(text.slots.float())
            terms["div_loss"] = cfg.div_weight * div
        return terms


def build_loss(cfg: LossConfig, similarity: Callable[[Tensor, Tensor], Tensor]) -> SetRetrievalLoss:
    """The training objective with the given (configured) set similarity."""
    if cfg.margin < 0:
        raise ValueError(f"'loss.margin' must be >= 0, got {cfg.margin}")
    return SetRetrievalLoss(cfg, similarity)
