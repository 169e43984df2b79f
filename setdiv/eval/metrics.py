"""Retrieval metrics on an image x caption similarity matrix (SPEC §6).

Shape legend: N images, M = 5N captions, image-major (caption c belongs to image c // 5).

Non-finite scores (NaN, +-inf) rank below every finite score, so a diverged model scores
near nothing, never RSUM 600; `recall_at_k` logs how many there were.

Ranks are 0-based. Ties are broken deterministically by index: an item's rank is the number
of items scored strictly higher plus the number scored equally that come earlier (lower
caption index for i2t, lower image index for t2i). That is the position a stable descending
sort gives, so a constant matrix ranks the first candidate first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["coco_1k", "i2t_ranks", "recall_at_k", "t2i_ranks"]

_CHUNK = 256
log = logging.getLogger(__name__)


def _target_ranks(scores_QC: Tensor, targets_QT: Tensor) -> Tensor:
    """(Q,T) ranks of the target columns within each row, ties broken by column index."""
    target_scores = scores_QC.gather(1, targets_QT)  # (Q, T)
    cols_C = torch.arange(scores_QC.shape[1], device=scores_QC.device)
    higher = (scores_QC[:, None, :] > target_scores[:, :, None]).sum(-1)
    tied_before = (
        (scores_QC[:, None, :] == target_scores[:, :, None]) & (cols_C < targets_QT[:, :, None])
    ).sum(-1)
    return higher + tied_before


def _as_tensor(sims: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(sims) if not isinstance(sims, Tensor) else sims)


def _finite_or_worst(sims: Tensor) -> tuple[Tensor, int]:
    """`sims` with every non-finite score (NaN, +-inf) replaced by -inf, and how many there
    were: a diverged model's scores rank below every finite score, never first (a NaN compares
    false with everything, which would give it rank 0). No copy when all are finite."""
    if not sims.is_floating_point():
        return sims, 0
    bad = ~torch.isfinite(sims)
    count = int(bad.sum())
    return (sims.masked_fill(bad, float("-inf")) if count else sims), count


def i2t_ranks(sims_NM: np.ndarray | Tensor, captions_per_image: int = 5) -> np.ndarray:
    """(N,) best (smallest) rank among each image's captions."""
    return _i2t_ranks(_finite_or_worst(_as_tensor(sims_NM))[0], captions_per_image)


def _i2t_ranks(sims: Tensor, captions_per_image: int) -> np.ndarray:
    N, M = sims.shape
    if M != captions_per_image * N:
        raise ValueError(f"similarity matrix {N}x{M} is not N x {captions_per_image}N")
    # The best-ranked positive is the highest-scored one (the first on ties), so one target
    # per row suffices.
    own = sims.view(N, N, captions_per_image)[torch.arange(N), torch.arange(N)]  # (N, 5)
    best = torch.arange(N)[:, None] * captions_per_image + own.argmax(dim=1, keepdim=True)
    out = [
        _target_ranks(sims[i : i + _CHUNK], best[i : i + _CHUNK])[:, 0] for i in range(0, N, _CHUNK)
    ]
    return torch.cat(out).numpy()


def t2i_ranks(sims_NM: np.ndarray | Tensor, captions_per_image: int = 5) -> np.ndarray:
    """(M,) rank of each caption's image among all images."""
    return _t2i_ranks(_finite_or_worst(_as_tensor(sims_NM))[0], captions_per_image)


def _t2i_ranks(sims: Tensor, captions_per_image: int) -> np.ndarray:
    sims_T = sims.T
    M = sims_T.shape[0]
    out = []
    for c in range(0, M, _CHUNK):
        cols = torch.arange(c, min(c + _CHUNK, M))
        out.append(_target_ranks(sims_T[cols], (cols // captions_per_image)[:, None])[:, 0])
    return torch.cat(out).numpy()


def recall_at_k(
    sims: np.ndarray | Tensor, captions_per_image: int = 5, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """R@K in percent for both directions, RSUM (sum of the recalls), median and mean rank
    (1-based), from an (N, captions_per_image*N) image-major similarity matrix."""
    sims, bad = _finite_or_worst(_as_tensor(sims))
    if bad:
        log.warning(
            "%d of %d scores are not finite (NaN/inf): ranked below every finite score",
            bad,
            sims.numel(),
        )
    i2t = _i2t_ranks(sims, captions_per_image)
    t2i = _t2i_ranks(sims, captions_per_image)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * float((ranks < k).mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = float(np.floor(np.median(ranks))) + 1
        out[f"{name}_meanr"] = float(ranks.mean()) + 1
    return out


def coco_1k(
    sims: np.ndarray | Tensor,
    captions_per_image: int = 5,
    folds: int = 5,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """COCO 1K protocol: metrics averaged over `folds` consecutive blocks of N/folds images."""
    sims = _as_tensor(sims)
    N = sims.shape[0]
    if N % folds:
        raise ValueError(f"{N} images do not split into {folds} folds")
    n = N // folds
    per_fold = [
        recall_at_k(
            sims[
                f * n : (f + 1) * n, f * n * captions_per_image : (f + 1) * n * captions_per_image
            ],
            captions_per_image,
            ks,
        )
        for f in range(folds)
    ]
    return {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}
