"""The training objective (docs/objectives.md): a ranking term over the batch's set-similarity
matrix (the triplet loss with hardest / mean / selective negatives, or symmetric InfoNCE with
a learnable temperature), plus the MMD and diversity regularisers.

Shape legend: N images, M captions (image-major: caption c belongs to image c // (M/N)),
K / L set sizes, D embedding width.

`SetRetrievalLoss` returns named, already weighted terms (`i2t_loss`, `t2i_loss`, `mmd_loss`,
`div_loss`); the caller sums them for the total.

    pairs.py         positive mask, the similarity matrix's spread (`sim_std`)
    triplet.py       triplet hinges: hardest, mean or selective negatives
    contrastive.py   symmetric InfoNCE, HN-NCE weighting, several captions per image
    regularisers.py  MMD, diversity
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from setdiv.config import LossConfig
from setdiv.distributed import all_gather_with_grad, rank_and_world
from setdiv.losses.contrastive import infonce_loss, infonce_terms, log_scale_bounds
from setdiv.losses.pairs import positive_mask, similarity_moments, similarity_spread
from setdiv.losses.regularisers import diversity_loss, diversity_per_sample, mmd_loss, mmd_rows
from setdiv.losses.triplet import NEGATIVES, triplet_loss, triplet_terms
from setdiv.model.set_modules import SetOutput

__all__ = [
    "NEGATIVES",
    "OBJECTIVES",
    "SetRetrievalLoss",
    "build_loss",
    "describe_objective",
    "diversity_loss",
    "infonce_loss",
    "mmd_loss",
    "positive_mask",
    "similarity_moments",
    "similarity_spread",
    "triplet_loss",
]

OBJECTIVES = ("triplet", "infonce")
"""The ranking terms `loss.name` chooses from."""


def _wide(t: Tensor) -> Tensor:
    """16-bit tensors in float32 for the regularisers; float32/64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class SetRetrievalLoss(nn.Module):
    """L = L_i2t + L_t2i + w_mmd * MMD + w_div * Div, as separately named terms.

    Under a process group the global batch is the concatenation of the ranks' batches: sets
    are all-gathered with gradient, each rank computes its image rows (i2t, negatives over ALL
    captions) and its caption columns (t2i, over ALL images), and every term is this rank's
    share, normalised by global counts. The shares sum over ranks to the whole-batch loss, and
    after the gather's backward each rank holds the whole-batch gradient for its own samples
    (and its share of the temperature's). (A data-parallel engine averages parameter gradients
    over ranks, so the caller back-propagates world_size x the local loss.)

    InfoNCE's temperature is a parameter of this module (`log_scale`, log of 1 / temperature,
    clamped as CLIP's logit scale) when `loss.learn_temperature`, a buffer otherwise: the
    trainer attaches the module to the model, so the optimizer steps it and checkpoints hold it.

    After each forward, `sim_moments` holds `similarity_moments` of this rank's rows of the
    similarity matrix: summed over ranks they describe the whole batch's matrix.
    """

    def __init__(self, cfg: LossConfig, similarity: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        if cfg.name not in OBJECTIVES:
            raise ValueError(f"loss.name must be one of {OBJECTIVES}, got {cfg.name!r}")
        self.cfg = cfg
        self.similarity = similarity
        self.sim_moments: Tensor | None = None
        self.last_temperature: float | None = None
        """InfoNCE: the temperature of the last forward (read there: a ZeRO-3 partition is
        whole only inside the forward)."""
        if cfg.name == "infonce":
            # (1,), not 0-d: DeepSpeed broadcasts parameters as byte views
            init = torch.full((1,), math.log(1 / cfg.temperature), dtype=torch.float32)
            if cfg.learn_temperature:
                self.log_scale = nn.Parameter(init)
            else:
                self.register_buffer("log_scale", init)

    # --- what the objective is at an epoch --------------------------------------------------

    def warming_up(self, epoch: int) -> bool:
        """The first `loss.mean_negative_epochs` epochs weigh all negatives alike."""
        return epoch < self.cfg.mean_negative_epochs

    def negatives(self, epoch: int, all_negatives: bool = False) -> str:
        """The triplet negatives in use: `loss.negatives`, or the mean while warming up or
        while the trainer's collapse guard asks for all negatives."""
        return "mean" if all_negatives or self.warming_up(epoch) else self.cfg.negatives

    def hn_beta(self, epoch: int, all_negatives: bool = False) -> float:
        """InfoNCE's hard-negative weighting in use (0 while warming up or falling back)."""
        return 0.0 if all_negatives or self.warming_up(epoch) else self.cfg.hn_beta

    def can_fall_back(self, epoch: int) -> bool:
        """Whether asking for all negatives changes the objective at `epoch` (it does not for
        mean negatives, nor for plain InfoNCE)."""
        if self.cfg.name == "infonce":
            return self.hn_beta(epoch) != 0
        return self.negatives(epoch) != "mean"

    def scale(self) -> Tensor:
        """InfoNCE's 1 / temperature: exp of the clamped `log_scale` (0-d)."""
        lo, hi = log_scale_bounds(self.cfg.max_logit_scale)
        return self.log_scale.clamp(lo, hi).exp().reshape(())

    # --- the loss ----------------------------------------------------------------------------

    def forward(
        self, image: SetOutput, text: SetOutput, epoch: int = 0, all_negatives: bool = False
    ) -> dict[str, Tensor]:
        """Local image sets (n,K,D), caption sets (5n,L,D), image-major -> this rank's share
        of each named term (world size 1: the whole loss). `all_negatives`: the collapse
        guard's fallback (mean negatives; InfoNCE without hard-negative weighting)."""
        cfg = self.cfg
        rank, world = rank_and_world()
        img_all, txt_all = all_gather_with_grad(image.embeds), all_gather_with_grad(text.embeds)
        n, m = image.embeds.shape[0], text.embeds.shape[0]
        N, M = img_all.shape[0], txt_all.shape[0]
        pos_NM = positive_mask(N, M, image.embeds.device)
        rows_nM = self.similarity(image.embeds, txt_all)
        cols_Nm = rows_nM if world == 1 else self.similarity(img_all, text.embeds)
        self.sim_moments = similarity_moments(rows_nM)
        pos_nM, pos_Nm = pos_NM[rank * n : (rank + 1) * n], pos_NM[:, rank * m : (rank + 1) * m]
        # image-major: every caption is one positive pair
        if cfg.name == "infonce":
            scale = self.scale()
            self.last_temperature = float(1 / scale.detach().double())
            beta = self.hn_beta(epoch, all_negatives)
            terms = infonce_terms(
                rows_nM, pos_nM, cols_Nm, pos_Nm, scale, beta, cfg.reduction, M, cfg.robust_q
            )
        else:
            negatives = self.negatives(epoch, all_negatives)
            terms = triplet_terms(
                rows_nM, pos_nM, cols_Nm, pos_Nm, cfg.margin, negatives, cfg.reduction, M,
                cfg.robust_q,
            )  # fmt: skip
        if cfg.mmd_weight:
            D = image.embeds.shape[-1]
            x, y = _wide(image.embeds.reshape(-1, D)), _wide(text.embeds.reshape(-1, D))
            xa, ya = _wide(img_all.reshape(-1, D)), _wide(txt_all.reshape(-1, D))
            terms["mmd_loss"] = cfg.mmd_weight * mmd_rows(x, xa, y, ya)
        if cfg.div_weight:
            div = diversity_per_sample(_wide(image.slots)).sum() / N
            div = div + diversity_per_sample(_wide(text.slots)).sum() / M
            terms["div_loss"] = cfg.div_weight * div
        return terms


def describe_objective(cfg: LossConfig) -> str:
    """One line naming the objective and the keys it reads (for the training log)."""
    warm = f", {cfg.mean_negative_epochs} epoch(s) of all negatives first" * bool(
        cfg.mean_negative_epochs
    )
    if cfg.name == "infonce":
        learned = "learned" if cfg.learn_temperature else "fixed"
        return (
            f"symmetric InfoNCE, temperature {cfg.temperature:g} ({learned}, at least "
            f"{1 / cfg.max_logit_scale:g}), hn_beta {cfg.hn_beta:g}, robust_q "
            f"{cfg.robust_q:g}{warm} "
            "(loss.margin and loss.negatives do not apply)"
        )
    robust = f", robust_q {cfg.robust_q:g}" * bool(cfg.robust_q)
    return f"triplet, margin {cfg.margin:g}, {cfg.negatives} negatives{robust}{warm}"


def build_loss(cfg: LossConfig, similarity: Callable[[Tensor, Tensor], Tensor]) -> SetRetrievalLoss:
    """The training objective with the given (configured) set similarity."""
    return SetRetrievalLoss(cfg, similarity)
