"""Seed ensembles: the element-wise mean of several models' similarity matrices (SPEC 6), scored
with the same protocol as each model alone."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from setdiv.eval.evaluator import EvalResult, protocol_metrics

__all__ = ["ensemble", "load_sims"]


def load_sims(path: str | Path) -> tuple[np.ndarray, dict]:
    """An evaluation's (N, 5N) `sims.npy` and the `sims_meta.json` beside it."""
    path = Path(path)
    meta_path = path.with_name("sims_meta.json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no sims_meta.json beside it")
    return np.load(path, allow_pickle=False), json.loads(meta_path.read_text())


def ensemble(
    paths: Sequence[str | Path], protocol: str, names: Sequence[str] | None = None
) -> tuple[dict[str, dict[str, float]], EvalResult]:
    """Score every member and their mean. Returns table rows (`NAME:PROTOCOL_KEY` per member,
    `ensemble:PROTOCOL_KEY`) and the ensemble's result (its (N, 5N) float32 mean matrix).

    All members must share shape, image ids and caption ids; names default to each file's
    directory name.
    """
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else [p.parent.name or p.stem for p in paths]
    loaded = [load_sims(p) for p in paths]
    first_sims, first_meta = loaded[0]
    for path, (sims, meta) in zip(paths[1:], loaded[1:], strict=True):
        if sims.shape != first_sims.shape:
            raise ValueError(f"{path}: shape {sims.shape} differs from {first_sims.shape}")
        for key in ("image_ids", "caption_ids"):
            if meta[key] != first_meta[key]:
                raise ValueError(f"{path}: {key} differ from {paths[0]}")
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
