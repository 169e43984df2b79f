"""Batch evaluation: encode every test image and caption once, compute the image x caption
set-similarity matrix block by block with image rows sharded across ranks, and score it.

Shape legend: N images, M = 5N captions, K / L set sizes, D embedding width.

Works on one process, under `setdiv eval --nproc N` (gloo on CPU, nccl on GPU) and from
inside training (any initialised process group). Every rank encodes its contiguous slice of
images with their captions; captions are all-gathered, each rank scores its image rows against
all captions, and the rows are all-gathered (rank 0 scores and writes them). Slices and row
chunks are aligned to the encoding batch, so the matrix is bit-identical whatever the number
of processes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from setdiv.config import Protocol
from setdiv.data.reader import Batch
from setdiv.data.shards import CAPTIONS_PER_IMAGE
from setdiv.distributed import all_gather_list, all_gather_rows
from setdiv.eval.metrics import coco_1k, recall_at_k
from setdiv.model import SetRetrievalModel

__all__ = [
    "STANDARD_SIZE",
    "EvalResult",
    "Encoded",
    "encode",
    "format_table",
    "protocol_metrics",
    "whole_set",
    "score_rows",
    "write_result",
]

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    images: Tensor
    """(N,K,D) image sets."""
    captions: Tensor
    """(M,L,D) caption sets, image-major."""
    image_ids: list[str]
    caption_ids: list[Any]
    skipped: int = 0
    captions_text: list[str] = field(default_factory=list)
    """The M caption texts."""
    caption_counts: list[int] = field(default_factory=list)
    """(N,) captions of each image (image-major)."""


@torch.no_grad()
def encode(
    model: SetRetrievalModel,
    batches: Iterable[Batch],
    device: torch.device,
    progress: bool = False,
    modality: str = "both",
) -> Encoded:
    """Encode every image and caption of `batches` once (eval mode, no grad), on `device`;
    `modality` "image" or "text" encodes that side only (the other stays empty)."""
    if modality not in ("both", "image", "text"):
        raise ValueError(f"modality must be both, image or text, got {modality!r}")
    model.eval()
    dtype = next(model.parameters()).dtype  # bf16 / fp16 engines take inputs in their dtype
    images, captions, image_ids, caption_ids, texts, counts, skipped = [], [], [], [], [], [], 0
    total = getattr(batches, "num_batches", None)
    for batch in tqdm(batches, desc="encode", unit="batch", total=total, disable=not progress):
        if modality != "text":
            mask = batch.image_mask.to(device) if batch.image_mask is not None else None
            images.append(model.encode_image(batch.images.to(device, dtype), mask).embeds.float())
        if modality != "image":
            text = model.encode_text(batch.tokens.to(device), batch.token_mask.to(device))
            captions.append(text.embeds.float())
        image_ids += batch.image_ids
        caption_ids += batch.caption_ids
        texts += batch.captions
        counts += batch.caption_counts
        skipped += batch.skipped
    empty = torch.zeros(0, 1, 1, device=device)
    return Encoded(
        torch.cat(images) if images else empty,
        torch.cat(captions) if captions else empty,
        image_ids,
        caption_ids,
        skipped,
        texts,
        counts,
    )


def score_rows(
    similarity: Callable[[Tensor, Tensor], Tensor], images: Tensor, captions: Tensor, chunk: int
) -> Tensor:
    """(n, M) similarities of this rank's image rows against all captions, in row chunks of
    `chunk` (the alignment of rank slices, so chunks match across world sizes)."""
    rows = [similarity(images[i : i + chunk], captions) for i in range(0, images.shape[0], chunk)]
    return torch.cat(rows) if rows else images.new_zeros(0, captions.shape[0])


@dataclass
class EvalResult:
    sims: np.ndarray
    """(N, M) float32 similarity matrix."""
    image_ids: list[str]
    caption_ids: list[Any]
    metrics: dict[str, dict[str, float]]
    meta: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    """matplotlib figures written as `<name>.png`."""


def gather_and_score(
    enc: Encoded,
    similarity: Callable[[Tensor, Tensor], Tensor],
    chunk: int,
    protocol: str,
) -> EvalResult | None:
    """All-gather captions, score local rows, gather rows; rank 0 (or a lone process) gets
    the result, other ranks None."""
    captions = all_gather_rows(enc.captions)
    caption_ids = all_gather_list(enc.caption_ids)
    with torch.no_grad():
        rows = score_rows(similarity, enc.images, captions, chunk)
    sims = all_gather_rows(rows)
    image_ids = all_gather_list(enc.image_ids)
    counts = all_gather_list(enc.caption_counts)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    sims_np = sims.float().cpu().numpy()
    owners = np.repeat(np.arange(len(counts)), counts) if counts else None
    metrics = protocol_metrics(sims_np, protocol, image_ids, caption_ids, owners)
    result = EvalResult(sims_np, image_ids, caption_ids, metrics)
    if counts and set(counts) != {CAPTIONS_PER_IMAGE}:
        result.meta["caption_counts"] = counts
    return result


STANDARD_SIZE = {"coco": 5000, "f30k": 1000}
"""Test images of each protocol's standard split (`web`: none, any size, any caption count)."""
_FULL_NAME = {"coco": "coco_5k", "f30k": "f30k_1k"}


def full_set_key(protocol: str, num_images: int) -> str:
    """Name of the whole-test-set metric group: coco_5k, f30k_1k, or <protocol>_<N> for a
    test set of another size."""
    standard = num_images == STANDARD_SIZE.get(protocol)
    return _FULL_NAME[protocol] if standard else f"{protocol}_{num_images}"


def whole_set(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """The whole-test-set group of `protocol_metrics` (coco_5k, f30k_1k, web_N, ...): the
    first."""
    return next(iter(metrics.values()))


def protocol_metrics(
    sims: np.ndarray,
    protocol: str,
    image_ids: list[str],
    caption_ids: list[Any],
    owners: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """The protocol's metric sets: COCO full set (5K) + 1K folds (+ ECCV/CxC for COCO ids),
    Flickr30K test; each a `recall_at_k` dict. `owners` (M,): the image of each caption,
    when images do not all have 5 (web data): the whole-set recalls only."""
    if protocol not in get_args(Protocol):
        raise ValueError(f"protocol must be one of {get_args(Protocol)}, got {protocol!r}")
    N, M = sims.shape
    five = owners is None or (
        M == CAPTIONS_PER_IMAGE * N and np.array_equal(owners, np.arange(M) // CAPTIONS_PER_IMAGE)
    )
    if not five:
        if protocol != "web":
            log.warning(
                "%d images with %d captions (not 5 each): whole-set recalls only, as protocol "
                "'web'", N, M,
            )  # fmt: skip
        return {full_set_key("web", N): recall_at_k(sims, owners=owners)}
    out = {full_set_key(protocol, N): recall_at_k(sims)}
    if protocol == "coco" and N % 1000 == 0 and N > 1000:
        out["coco_1k"] = coco_1k(sims, folds=N // 1000)
    if protocol == "coco":
        extended = eccv_metrics(sims, image_ids, caption_ids)
        if extended is not None:
            out["eccv_cxc"] = extended
    return out


def _coco_int_ids(ids: list[Any]) -> list[int] | None:
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError):
        return None


def eccv_metrics(
    sims: np.ndarray, image_ids: list[Any], caption_ids: list[Any], top: int = 100
) -> dict[str, float] | None:
    """ECCV Caption mAP@R / R-Precision / R@1 and CxC R@1 via `eccv_caption`, when the ids are
    COCO 5K-test image ids and COCO caption ids; None (with a log line) otherwise."""
    img, cap = _coco_int_ids(image_ids), _coco_int_ids(caption_ids)
    if img is None or cap is None:
        log.info("ECCV/CxC skipped: image or caption ids are not integers (not COCO ids)")
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eccv_caption warns when ujson is missing
        from eccv_caption import Metrics

    metric = Metrics()
    gts = metric.coco_gts  # type: ignore[attr-defined]
    if not set(img) <= set(gts["i2t"]) or not set(cap) <= set(gts["t2i"]):
        log.info("ECCV/CxC skipped: ids are not COCO 5K-test image / caption ids")
        return None
    s = torch.from_numpy(sims)
    k_cap, k_img = min(top, s.shape[1]), min(top, s.shape[0])
    cap_arr, img_arr = np.asarray(cap), np.asarray(img)
    i2t = {
        img[i]: cap_arr[row].tolist() for i, row in enumerate(s.topk(k_cap, dim=1).indices.numpy())
    }
    t2i = {
        cap[c]: img_arr[col].tolist()
        for c, col in enumerate(s.T.topk(k_img, dim=1).indices.numpy())
    }
    scores = metric.compute_all_metrics(
        i2t,
        t2i,
        target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "cxc_r1"),
        verbose=False,
    )
    return {
        f"{name}_{d}": 100.0 * float(v[d]) for name, v in scores.items() for d in ("i2t", "t2i")
    }


_RECALL_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def format_table(metrics: dict[str, dict[str, float]], title: str = "") -> str:
    """The paper's table layout: one row per protocol, R@1/5/10 each way and RSUM."""
    w = max([12, *(len(n) + 2 for n in metrics)])
    lines = [title] if title else []
    lines.append(f"{'':<{w}}{'image-to-text':^24}{'text-to-image':^24}")
    lines.append(
        f"{'protocol':<{w}}"
        + "".join(f"{c.split('_')[1].upper():>8}" for c in _RECALL_COLUMNS[:6])
        + f"{'RSUM':>9}"
    )
    for name, m in metrics.items():
        if "rsum" in m:
            lines.append(
                f"{name:<{w}}"
                + "".join(f"{m[c]:8.1f}" for c in _RECALL_COLUMNS[:6])
                + f"{m['rsum']:9.1f}"
            )
        else:
            lines.append(f"{name:<{w}}" + "  ".join(f"{k}={v:.4g}" for k, v in m.items()))
    return "\n".join(lines)


def write_result(result: EvalResult, out_dir: str | Path) -> Path:
    """`sims.npy`, `sims_meta.json` (ids, similarity, checkpoint hash, ...) and `metrics.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "sims.npy", result.sims.astype(np.float32))
    meta = {"image_ids": result.image_ids, "caption_ids": result.caption_ids, **result.meta}
    (out / "sims_meta.json").write_text(json.dumps(meta, default=str))
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    for name, fig in result.figures.items():
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    return out
