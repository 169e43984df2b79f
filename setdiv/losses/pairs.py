"""The batch's pairs: which captions are an image's positives, and the spread of the batch's
similarity matrix (the collapse diagnostic `sim_std`).

Shape legend: N images, M captions (image-major: caption c belongs to image c // (M/N)).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["positive_mask", "similarity_moments", "similarity_spread"]


def positive_mask(num_images: int, num_captions: int, device: torch.device | None = None) -> Tensor:
    """(N,M) bool: caption c is a positive of image c // (M/N) (image-major batches)."""
    if num_captions % num_images:
        raise ValueError(f"{num_captions} captions do not split evenly over {num_images} images")
    per_image = num_captions // num_images
    owner_M = torch.arange(num_captions, device=device) // per_image
    return owner_M[None, :] == torch.arange(num_images, device=device)[:, None]


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
