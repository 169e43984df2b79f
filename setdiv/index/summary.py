"""Set summaries: one vector per set whose inner products approximate smooth-Chamfer.

A second-order expansion of the log-sum-exp in smooth-Chamfer turns the set similarity into
one inner product of fixed-size vectors (the mean plus second moments in the top-r principal
directions of the gallery's elements), so a FAISS index over the summaries proposes the sets
most likely to score high; `search.adaptive_top_k` rescores them exactly.

Shape legend: N gallery sets, Q queries, K / L set sizes, D embedding width, r projection rank.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["SUMMARY_RANK", "principal_directions", "query_summaries", "set_summaries"]

SUMMARY_RANK = 32
"""r: the second-order part of a summary lives in the top-r principal directions."""
SVD_SAMPLE = 100_000
"""Elements the principal directions are computed from (a random sample)."""


def _tri(A_Nrr: Tensor) -> Tensor:
    """(N, r(r+1)/2) upper triangles of symmetric matrices, off-diagonals x sqrt(2): the inner
    product of two such rows is the Frobenius product of the matrices."""
    r = A_Nrr.shape[-1]
    i, j = torch.triu_indices(r, r)
    return A_Nrr[:, i, j] * torch.where(i == j, 1.0, math.sqrt(2.0))


def _moments(sets_NKD: Tensor, P_Dr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean (N, D), projected second moment (N, r, r) and outer product of the projected mean
    (N, r, r) of each set."""
    z = sets_NKD.float() @ P_Dr
    zbar = z.mean(dim=1)
    second = torch.einsum("nkr,nks->nrs", z, z) / z.shape[1]
    return sets_NKD.float().mean(dim=1), second, zbar[:, :, None] * zbar[:, None, :]


def set_summaries(gallery_NKD: Tensor, P_Dr: Tensor) -> Tensor:
    """(N, D + r(r+1)) gallery summaries; with `query_summaries` their inner product is the
    second-order expansion of smooth-Chamfer in the projected space. Expanding each LSE over
    a set to second order, and writing M for a set's second moment and m for its mean,

        s(x, y) ~ const + mx.my + alpha/4 (2 <Mx, My> - my' Mx my - mx' My mx)

    which is one inner product of [mx, Mx, mx mx'] with [my, alpha/4 (2 My - my my'), -alpha/4
    My] (symmetric in x and y). M and the quadratic terms are taken in the top-r directions."""
    mean, second, outer = _moments(gallery_NKD, P_Dr)
    return torch.cat([mean, _tri(second), _tri(outer)], dim=1)


def query_summaries(queries_QLD: Tensor, P_Dr: Tensor, alpha: float) -> Tensor:
    """(Q, D + r(r+1)) query summaries matching `set_summaries`."""
    mean, second, outer = _moments(queries_QLD, P_Dr)
    w = alpha / 4
    return torch.cat([mean, w * _tri(2 * second - outer), -w * _tri(second)], dim=1)


def principal_directions(elements_ED: np.ndarray, rank: int = SUMMARY_RANK) -> np.ndarray:
    """(D, r) top-r right singular vectors of (a sample of) the uncentred elements."""
    rng = np.random.default_rng(0)
    sample = elements_ED[rng.permutation(len(elements_ED))[:SVD_SAMPLE]]
    vt = np.linalg.svd(sample.astype(np.float64), full_matrices=False)[2]
    return np.ascontiguousarray(vt[: min(rank, vt.shape[0])].T, dtype=np.float32)
