"""Analysis of embedding sets (SPEC §6)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["circular_variance"]


def circular_variance(embeds_NKD: Tensor) -> Tensor:
    """Per-set circular variance `1 - || mean_k e_k ||` of unit-norm sets (N,K,D) -> (N,).

    0 when all K elements coincide, approaching 1 when they spread out evenly. Average the
    result over a split for the paper's per-modality number.
    """
    if embeds_NKD.dim() != 3:
        raise ValueError(f"expected sets (N,K,D), got shape {tuple(embeds_NKD.shape)}")
    return 1.0 - embeds_NKD.float().mean(dim=1).norm(dim=-1)
