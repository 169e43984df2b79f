"""Statistics of embedding sets and of the slot attention that builds them (docs/method.md §6): how
spread out a set's elements are, how much each slot concentrates."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["circular_variance", "slot_specialisation"]


def circular_variance(embeds_NKD: Tensor) -> Tensor:
    """Per-set circular variance `1 - || mean_k e_k ||` of unit-norm sets (N,K,D) -> (N,).

    0 when all K elements coincide, approaching 1 when they spread out evenly. Average the
    result over a split for the paper's per-modality number.
    """
    if embeds_NKD.dim() != 3:
        raise ValueError(f"expected sets (N,K,D), got shape {tuple(embeds_NKD.shape)}")
    return 1.0 - embeds_NKD.float().mean(dim=1).norm(dim=-1)


def slot_specialisation(attn_BKR: Tensor, mask_BR: Tensor | None = None) -> tuple[Tensor, float]:
    """How much each slot concentrates: the mean over images of slot k's largest attention
    weight over the valid inputs -> (K,), and what uniform attention would give (the mean of
    1 / R_valid). A slot that attends to one region scores 1, an unspecialised one 1/R."""
    if attn_BKR.dim() != 3:
        raise ValueError(f"expected attention (B,K,R), got shape {tuple(attn_BKR.shape)}")
    if mask_BR is None:
        mask_BR = torch.ones(attn_BKR.shape[0], attn_BKR.shape[2], dtype=torch.bool)
    mask_BR = mask_BR.to(attn_BKR.device)
    peak_BK = attn_BKR.float().masked_fill(~mask_BR[:, None, :], float("-inf")).amax(dim=-1)
    uniform = float((1.0 / mask_BR.sum(dim=1).clamp_min(1).float()).mean())
    return peak_BK.mean(dim=0), uniform
