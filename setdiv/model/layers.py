"""The parts every encoder shares (the CNN and region encoders here, the timm / open_clip
towers in `setdiv.model.towers`): what an encoder returns, masked pooling, and the projection
head with its rank-synchronised, padding-blind BatchNorm.

Shape legend: B batch, R regions / grid cells / tokens, C input width, D embedding width,
T real rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from setdiv.distributed.collectives import all_reduce_sum_with_grad

__all__ = ["Features", "ProjectionHead", "SyncMaskedBatchNorm", "masked_max", "masked_mean"]


class Features(NamedTuple):
    # A NamedTuple (not a dataclass) so ZeRO-3 sees the tensors and hooks their backward.
    local: Tensor
    """(B,R,Din) local features, the set module's keys and values."""
    mask: Tensor
    """(B,R) bool, True for real inputs, False for padding."""
    pooled: Tensor
    """(B,D) global feature fused into every set element."""
    pos: Tensor | None
    """(R,Din) positional encoding added to the keys, or None."""


def masked_max(x_BRD: Tensor, mask_BR: Tensor) -> Tensor:
    return x_BRD.masked_fill(~mask_BR[:, :, None], float("-inf")).amax(dim=1)


def masked_mean(x_BRD: Tensor, mask_BR: Tensor) -> Tensor:
    w_BR1 = mask_BR[:, :, None].to(x_BRD.dtype)
    return (x_BRD * w_BR1).sum(dim=1) / w_BR1.sum(dim=1).clamp_min(1.0)


class SyncMaskedBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over a (T, C) set of rows (the real inputs of a batch), with training
    statistics summed over all ranks, differentiably (SyncBatchNorm semantics on CPU or GPU):
    a global batch split over ranks normalises exactly like the whole batch in one process."""

    def forward(self, x_TC: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x_TC)
        x = x_TC.float()
        stats = all_reduce_sum_with_grad(
            torch.cat([x.sum(0), x.pow(2).sum(0), x.new_tensor([x.shape[0]])])
        )
        C = x.shape[1]
        count = stats[-1]
        mean = stats[:C] / count
        var = (stats[C : 2 * C] / count - mean.pow(2)).clamp_min(0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            unbiased = var * count / (count - 1).clamp_min(1)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * unbiased.detach())
            self.num_batches_tracked += 1
        out = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return out.to(x_TC.dtype)


class ProjectionHead(nn.Module):
    """Linear(Cin, D) plus a residual 2-layer MLP (D -> D/2 -> D), as in VSE-infinity / DivE.

    The MLP's BatchNorm sees only real (unmasked) inputs, so padding never shifts its statistics.
    """

    def __init__(self, dim_in: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim_in, dim)
        self.fc1 = nn.Linear(dim, dim // 2)
        self.bn = SyncMaskedBatchNorm(dim // 2)
        self.fc2 = nn.Linear(dim // 2, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BRC: Tensor, mask_BR: Tensor) -> Tensor:
        base_BRD = self.fc(x_BRC)
        h_BRH = self.fc1(base_BRD)
        normed = h_BRH.new_zeros(h_BRH.shape)
        normed[mask_BR] = self.bn(h_BRH[mask_BR])
        return self.dropout(base_BRD + self.fc2(torch.relu(normed)))
