"""The frozen-feature cache that `setdiv extract` writes and `data.features` reads: where a
source shard's features live, and which tower, weights and transform made them.

A source shard `.../web/00000.tar` becomes `features-00000.<digest>.tar`, the digest taken from
the source's absolute path: img2dataset names every dataset's shards `00000.tar`, so the name
alone would let two sources share one entry. `cache.json` records the tower (name, arch,
sha256 of its weights file) and the image transform; an extraction or a training run with
another of them is refused, never mixed with the features already there.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from setdiv.config import Config
from setdiv.data import remote
from setdiv.data.shards import ShardSet, sha256_file
from setdiv.errors import UserError

__all__ = [
    "CACHE_FILE",
    "PREFIX",
    "cache_name",
    "cached_shards",
    "check_cache",
    "check_training_cache",
    "read_identity",
    "tower_identity",
    "write_json_atomic",
]

CACHE_FILE = "cache.json"
PREFIX = "features"
"""Every cache entry is `features-*.tar`, listed in one `features-index.json`."""
_FORMAT = "setdiv-features/1"


def cache_name(source: str | Path) -> str:
    """The cache entry of source shard `source`: its stem (dashes as underscores, so the index
    prefix stays `features`) and 12 hex digits of the sha256 of its absolute path (or URL)."""
    where = str(source) if remote.is_remote(source) else str(Path(source).resolve())
    digest = hashlib.sha256(where.encode()).hexdigest()[:12]
    return f"{PREFIX}-{remote.name(source).removesuffix('.tar').replace('-', '_')}.{digest}.tar"


def tower_identity(cfg: Config) -> dict[str, Any]:
    """What the cached features depend on: the image tower (name, arch, sha256 of the weights
    file; None for random init) and the test transform of `cfg` (tower preprocessing applied)."""
    image, data = cfg.model.image, cfg.data
    weights = Path(image.weights) if image.weights else None
    if weights is not None and not weights.is_file():
        raise UserError(f"config key 'model.image.weights': no such file {weights}")
    return {
        "format": _FORMAT,
        "tower": image.name,
        "arch": image.arch,
        "weights_sha256": sha256_file(weights) if weights else None,
        "transform": {
            "image_size": data.image_size,
            "image_transform": data.image_transform,
            "interpolation": data.interpolation,
            "crop_pct": data.crop_pct,
            "mean": list(data.image_mean) if data.image_mean is not None else None,
            "std": list(data.image_std) if data.image_std is not None else None,
            "fast_decode": data.fast_decode,
        },
    }


def read_identity(root: Path) -> dict[str, Any] | None:
    """The identity `cache.json` records in `root` (None if there is none); a record that
    does not parse is an error naming it."""
    path = Path(root) / CACHE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON cache record ({exc}): delete the cache") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise UserError(f"{path}: not a setdiv feature-cache record: delete the cache")
    return record


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    def short(value: Any) -> Any:  # (12 hex digits name a weights file well enough)
        return value[:12] + "..." if isinstance(value, str) and len(value) == 64 else value

    out = [
        f"{key} {short(have.get(key))!r} (asked: {short(want[key])!r})"
        for key in ("tower", "arch", "weights_sha256")
        if have.get(key) != want[key]
    ]
    # (records written before data.fast_decode existed were made decoding whole images)
    ht, wt = {"fast_decode": False, **(have.get("transform") or {})}, want["transform"]
    out += [f"data.{k} {ht.get(k)!r} (asked: {wt[k]!r})" for k in wt if ht.get(k) != wt[k]]
    return out


def check_cache(root: Path, want: dict[str, Any], remedy: str) -> None:
    """Refuse a cache at `root` made by another tower, weights or transform than `want`
    (`tower_identity`), or holding features without a record of what made them."""
    root = Path(root)
    have = read_identity(root)
    if have is None:
        if any(root.glob(f"{PREFIX}-*.tar")) or any(root.glob("*.done")):
            raise UserError(
                f"{root} holds features without a {CACHE_FILE} record of the tower that made "
                f"them: {remedy}"
            )
        return
    differ = _differences(have, want)
    if differ:
        raise UserError(f"{root} holds features of another tower or transform: "
                        f"{'; '.join(differ[:3])}: {remedy}")  # fmt: skip


def cached_shards(root: str | Path, pattern: str) -> str:
    """`pattern`'s entries in the cache at `root` (`data.features`), as a brace pattern; a
    shard without an entry is an error naming it."""
    root = Path(root)
    sources = ShardSet.expand(pattern)
    missing = [p for p in sources if not (root / cache_name(p)).is_file()]
    if missing:
        raise UserError(
            f"config key 'data.features': {root} has no features of "
            f"{[str(p) for p in missing[:3]]} ({len(missing)} of {len(sources)} shards): run "
            f"`setdiv extract` over {pattern!r}"
        )
    paths = [str(root / cache_name(p)) for p in sources]
    return "{" + ",".join(paths) + "}" if len(paths) > 1 else paths[0]


def check_training_cache(cfg: Config) -> None:
    """Training from `data.features`: the cache must exist and hold the features of the
    config's tower, weights and transform."""
    root = Path(cfg.data.features)  # type: ignore[arg-type]
    if not root.is_dir():
        raise UserError(f"config key 'data.features': no such directory {root}")
    check_cache(
        root,
        tower_identity(cfg),
        "train with the config it was extracted with, or run `setdiv extract` into another "
        "directory",
    )


def write_json_atomic(path: Path, record: dict[str, Any]) -> None:
    """`record` as JSON at `path`, written whole or not at all (a temporary file renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
