"""Retrieval metrics on an image x caption similarity matrix (docs/method.md §6).

Shape legend: N images, M captions. By default M = 5N, image-major (caption c belongs to
image c // 5); `owners` gives any other layout: the image of each caption (web data has one
caption per image, other sets a variable number).

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

__all__ = ["caption_owners", "coco_1k", "i2t_ranks", "recall_at_k", "t2i_ranks"]

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


def caption_owners(num_images: int, num_captions: int, captions_per_image: int) -> np.ndarray:
    """(M,) the image of each caption in an image-major matrix of `captions_per_image` each."""
    if num_captions != captions_per_image * num_images:
        raise ValueError(
            f"similarity matrix {num_images}x{num_captions} is not N x {captions_per_image}N"
        )
    return np.arange(num_captions) // captions_per_image


def _check_owners(owners: np.ndarray | Sequence[int], N: int, M: int) -> np.ndarray:
    owners = np.asarray(owners, dtype=np.int64)
    if owners.shape != (M,):
        raise ValueError(f"{owners.shape[0] if owners.ndim else 0} caption owners for {M} captions")
    if M and (owners.min() < 0 or owners.max() >= N):
        raise ValueError(f"caption owners must be image indices in [0, {N})")
    if len(np.unique(owners)) != N:
        missing = sorted(set(range(N)) - set(owners.tolist()))[:5]
        raise ValueError(f"images without a caption (e.g. {missing}): they cannot be scored")
    return owners


def _owners(sims: Tensor, captions_per_image: int, owners: Sequence[int] | None) -> np.ndarray:
    N, M = sims.shape
    if owners is None:
        return caption_owners(N, M, captions_per_image)
    return _check_owners(owners, N, M)


def i2t_ranks(
    sims_NM: np.ndarray | Tensor, captions_per_image: int = 5, owners: Sequence[int] | None = None
) -> np.ndarray:
    """(N,) best (smallest) rank among each image's captions."""
    sims = _finite_or_worst(_as_tensor(sims_NM))[0]
    return _i2t_ranks(sims, _owners(sims, captions_per_image, owners))


def _i2t_ranks(sims: Tensor, owners: np.ndarray) -> np.ndarray:
    N, M = sims.shape
    # The best-ranked positive is the highest-scored one (the first on ties), so one target
    # per row suffices: sort captions by (owner, score descending, index), take each owner's
    # first.
    own = sims[torch.from_numpy(owners), torch.arange(M)].double().numpy()  # (M,)
    order = np.lexsort((np.arange(M), -own, owners))
    firsts = np.flatnonzero(np.r_[True, owners[order][1:] != owners[order][:-1]])
    best = torch.from_numpy(order[firsts])[:, None]  # (N, 1), image n's best caption
    out = [
        _target_ranks(sims[i : i + _CHUNK], best[i : i + _CHUNK])[:, 0] for i in range(0, N, _CHUNK)
    ]
    return torch.cat(out).numpy()


def t2i_ranks(
    sims_NM: np.ndarray | Tensor, captions_per_image: int = 5, owners: Sequence[int] | None = None
) -> np.ndarray:
    """(M,) rank of each caption's image among all images."""
    sims = _finite_or_worst(_as_tensor(sims_NM))[0]
    return _t2i_ranks(sims, _owners(sims, captions_per_image, owners))


def _t2i_ranks(sims: Tensor, owners: np.ndarray) -> np.ndarray:
    sims_T = sims.T
    M = sims_T.shape[0]
    targets = torch.from_numpy(owners)
    out = []
    for c in range(0, M, _CHUNK):
        cols = torch.arange(c, min(c + _CHUNK, M))
        out.append(_target_ranks(sims_T[cols], targets[cols][:, None])[:, 0])
    return torch.cat(out).numpy()


def recall_at_k(
    sims: np.ndarray | Tensor,
    captions_per_image: int = 5,
    ks: Sequence[int] = (1, 5, 10),
    owners: Sequence[int] | None = None,
) -> dict[str, float]:
    """R@K in percent for both directions, RSUM (sum of the recalls), median and mean rank
    (1-based), from an (N, M) similarity matrix: image-major with `captions_per_image` each,
    or with caption c belonging to image `owners[c]` (any number of captions per image, at
    least one)."""
    sims, bad = _finite_or_worst(_as_tensor(sims))
    if bad:
        log.warning(
            "%d of %d scores are not finite (NaN/inf): ranked below every finite score",
            bad,
            sims.numel(),
        )
    own = _owners(sims, captions_per_image, owners)
    i2t = _i2t_ranks(sims, own)
    t2i = _t2i_ranks(sims, own)
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
