"""Sine positional encodings added to the keys of the set modules (docs/method.md §2.4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sine_positions_1d", "sine_positions_2d"]


def sine_positions_1d(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Transformer sine encoding of positions 0..length-1 -> (length, dim).

    Unlike the official code, positions are not divided by the padded batch length, so a
    token's encoding does not depend on how much padding its batch has.
    """
    pos_R1 = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(dim, device=device)
    freq = torch.exp(-(math.log(10000.0) * (2 * (i // 2)).float() / dim))
    angle_RD = pos_R1 * freq
    return torch.where(i % 2 == 0, angle_RD.sin(), angle_RD.cos())


def sine_positions_2d(
    height: int, width: int, dim: int, device: torch.device | None = None
) -> Tensor:
    """DETR-style 2-D sine encoding of a (height, width) grid -> (height*width, dim).

    dim/2 channels encode y and dim/2 encode x (normalised to [0, 2 pi]); rows are in raster order.
    """
    if dim % 2:
        raise ValueError(f"2-D positional encoding needs an even width, got {dim}")
    half = dim // 2
    eps = 1e-6
    y = (
        (torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + eps))
        * 2
        * math.pi
    )
    x = (
        (torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + eps))
        * 2
        * math.pi
    )
    i = torch.arange(half, device=device)
    dim_t = 10000.0 ** (2 * (i // 2).float() / half)

    def enc(v: Tensor) -> Tensor:
        a = v[:, None] / dim_t
        return torch.where(i % 2 == 0, a.sin(), a.cos())

    y_HWC = enc(y)[:, None, :].expand(height, width, half)
    x_HWC = enc(x)[None, :, :].expand(height, width, half)
    return torch.cat([y_HWC, x_HWC], dim=-1).reshape(height * width, dim)
