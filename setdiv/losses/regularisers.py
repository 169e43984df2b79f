"""The set regularisers of the DivE objective: MMD between the image and caption element
clouds, and the diversity of each set's pre-fusion slots.

Shape legend: P / Q elements, B sets, K set size, D embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["diversity_loss", "diversity_per_sample", "mmd_loss", "mmd_rows"]


def _kernel_sum(a_PD: Tensor, b_QD: Tensor) -> Tensor:
    """sum_ij exp(-0.5 ||a_i - b_j||) (distance not squared)."""
    # ||a - b|| from Gram entries; the clamp keeps sqrt's gradient finite at distance 0.
    d2 = (a_PD.pow(2).sum(1)[:, None] + b_QD.pow(2).sum(1)[None, :] - 2 * a_PD @ b_QD.T).clamp_min(
        1e-12
    )
    return torch.exp(-0.5 * d2.sqrt()).sum()


def mmd_loss(x_PD: Tensor, y_QD: Tensor) -> Tensor:
    """Biased MMD estimate between element clouds x (P,D) and y (Q,D), k = exp(-0.5 ||x - y||)."""
    return mmd_rows(x_PD, x_PD, y_QD, y_QD)


def mmd_rows(x_pD: Tensor, x_PD: Tensor, y_qD: Tensor, y_QD: Tensor) -> Tensor:
    """A share of `mmd_loss(x_PD, y_QD)`: the rows x_pD, y_qD of the three kernel sums (all
    rows: the whole estimate)."""
    P, Q = x_PD.shape[0], y_QD.shape[0]
    return (
        _kernel_sum(x_pD, x_PD) / P**2
        + _kernel_sum(y_qD, y_QD) / Q**2
        - 2 * _kernel_sum(x_pD, y_QD) / (P * Q)
    )


def diversity_per_sample(slots_BKD: Tensor) -> Tensor:
    """(B,K,D) slots -> (B,) 2/(K(K-1)) sum_{i<j} exp(-2 ||r_i - r_j||^2), r = l2norm(slots)."""
    B, K, _ = slots_BKD.shape
    if K < 2:
        return slots_BKD.new_zeros(B)
    r_BKD = F.normalize(slots_BKD, dim=-1)
    d2_BKK = (2 - 2 * r_BKD @ r_BKD.transpose(1, 2)).clamp_min(0)
    i, j = torch.triu_indices(K, K, offset=1, device=slots_BKD.device)
    return torch.exp(-2 * d2_BKK[:, i, j]).mean(dim=1)


def diversity_loss(slots_BKD: Tensor) -> Tensor:
    """Mean over samples of 2/(K(K-1)) sum_{i<j} exp(-2 ||r_i - r_j||^2), r = l2norm(slots)."""
    return diversity_per_sample(slots_BKD).mean()
