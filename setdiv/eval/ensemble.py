"""Seed ensembles: the element-wise mean of several models' similarity matrices
(docs/method.md §6), scored with the same protocol as each model alone."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from setdiv.data.shards import CAPTIONS_PER_IMAGE
from setdiv.errors import UserError
from setdiv.eval.evaluator import EvalResult, protocol_metrics

__all__ = ["ensemble", "load_sims", "member_names"]


def load_sims(path: str | Path) -> tuple[np.ndarray, dict]:
    """An evaluation's (N, 5N) `sims.npy` and the `sims_meta.json` beside it, checked against
    each other (shape, id counts). Raises ValueError / FileNotFoundError naming the file."""
    path = Path(path)
    meta_path = path.with_name("sims_meta.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such similarity matrix")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no sims_meta.json beside it (written by setdiv eval)")
    try:
        sims = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable .npy matrix: {exc}") from None
    try:
        meta = json.loads(meta_path.read_text())
        n_img, n_cap = len(meta["image_ids"]), len(meta["caption_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{meta_path}: not an evaluation's metadata ({exc!r})") from None
    if sims.ndim != 2 or sims.shape[1] != CAPTIONS_PER_IMAGE * sims.shape[0]:
        raise UserError(
            f"{path}: shape {sims.shape} is not N x {CAPTIONS_PER_IMAGE}N (images x captions)"
        )
    if sims.shape != (n_img, n_cap):
        raise UserError(
            f"{path}: shape {sims.shape} does not match the {n_img} image and {n_cap} caption "
            f"ids of {meta_path}"
        )
    return sims, meta


def member_names(paths: Sequence[Path]) -> list[str]:
    """One label per member: the shortest trailing part of its folder's path that tells the
    members apart and is not "ensemble" (the mean's row): `a/eval`, `b/eval` for
    `runs/a/eval/sims.npy`, `runs/b/eval/sims.npy`; the same file given twice gets `#2`."""
    folders = [Path(p).resolve().parent.parts for p in paths]
    unique = list(dict.fromkeys(folders))
    labels: dict[tuple[str, ...], str] = {}
    for d in range(1, max(len(f) for f in unique) + 1):
        labels = {f: "/".join(f[-d:]) for f in unique}
        if len(set(labels.values())) == len(unique) and "ensemble" not in labels.values():
            break
    names = [labels[f] for f in folders]
    return [
        f"{n}#{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)
    ]


def ensemble(
    paths: Sequence[str | Path], protocol: str | None = None, names: Sequence[str] | None = None
) -> tuple[dict[str, dict[str, float]], EvalResult]:
    """Score every member and their mean. Returns table rows (`NAME:PROTOCOL_KEY` per member,
    `ensemble:PROTOCOL_KEY`) and the ensemble's result (its (N, 5N) float32 mean matrix).

    All members must share shape, image ids, caption ids and the protocol they were evaluated
    with (`protocol`, when given, must be it); names default to `member_names`.
    """
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else member_names(paths)
    loaded = [load_sims(p) for p in paths]
    protocol = _protocol(paths, [meta for _, meta in loaded], protocol)
    first_sims, first_meta = loaded[0]
    for path, (sims, meta) in zip(paths[1:], loaded[1:], strict=True):
        if sims.shape != first_sims.shape:
            raise UserError(f"{path}: shape {sims.shape} differs from {first_sims.shape}")
        for key in ("image_ids", "caption_ids"):
            if meta[key] != first_meta[key]:
                raise UserError(f"{path}: {key} differ from {paths[0]}")
    mean = np.mean(np.stack([s for s, _ in loaded]), axis=0, dtype=np.float64).astype(np.float32)
    ids = (first_meta["image_ids"], first_meta["caption_ids"])
    rows: dict[str, dict[str, float]] = {}
    for name, (sims, _) in zip(names, loaded, strict=True):
        for key, m in protocol_metrics(sims, protocol, *ids).items():
            rows[f"{name}:{key}"] = m
    metrics = protocol_metrics(mean, protocol, *ids)
    rows.update({f"ensemble:{key}": m for key, m in metrics.items()})
    meta = {"members": [str(p) for p in paths], "protocol": protocol}
    return rows, EvalResult(mean, *ids, metrics, meta)


def _protocol(paths: list[Path], metas: list[dict], asked: str | None) -> str:
    """The protocol the members were evaluated with (older metadata without one: `asked`)."""
    found = {str(p): m["protocol"] for p, m in zip(paths, metas, strict=True) if "protocol" in m}
    if len(set(found.values())) > 1:
        raise UserError(f"members were evaluated with different protocols: {found}")
    recorded = next(iter(found.values()), None)
    if asked is not None and recorded is not None and asked != recorded:
        raise UserError(f"--protocol {asked}, but the members were evaluated with {recorded}")
    if recorded is None and asked is None:
        raise UserError("the members' sims_meta.json name no protocol: pass --protocol")
    return recorded or asked  # type: ignore[return-value]
