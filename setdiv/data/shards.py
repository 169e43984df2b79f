"""WebDataset shards of image-caption samples, and the index file written next to them.

One sample per image:
  __key__     the image id as text
  .jpg        the image as JPEG bytes          (kind "image")
  .npy        its region features (R, C)       (kind "regions")
  .json       {"image_id", "captions": [5 str], "caption_ids": [5]}

Next to the shards `{split}-index.json` records, per shard, its name, sample count and sha256,
plus the source: the reader plans epochs from it without opening a tar, and verifies checksums.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from braceexpand import braceexpand

from setdiv.errors import UserError

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "Sample",
    "ShardIndex",
    "ShardInfo",
    "ShardSet",
    "decode_meta",
    "index_path",
    "read_shard",
    "sha256_file",
    "write_shards",
]

log = logging.getLogger(__name__)
CAPTIONS_PER_IMAGE = 5
INDEX_FORMAT = "setdiv-shards/1"


@dataclass
class Sample:
    image_id: str
    captions: list[str]
    caption_ids: list[str | int]
    jpg: bytes | None = None
    regions: np.ndarray | None = None

    def to_wds(self) -> dict[str, Any]:
        meta = {
            "image_id": self.image_id,
            "captions": self.captions,
            "caption_ids": self.caption_ids,
        }
        out: dict[str, Any] = {"__key__": str(self.image_id), "json": json.dumps(meta).encode()}
        if self.jpg is not None:
            out["jpg"] = self.jpg
        if self.regions is not None:
            buf = io.BytesIO()
            np.save(buf, self.regions, allow_pickle=False)
            out["npy"] = buf.getvalue()
        return out


@dataclass
class ShardInfo:
    name: str
    samples: int
    sha256: str


@dataclass
class ShardIndex:
    split: str
    kind: str
    source: str
    shards: list[ShardInfo] = field(default_factory=list)
    dropped: int = 0
    """Images left out at conversion (e.g. fewer than 5 captions with --min-captions)."""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def save(self, directory: Path) -> Path:
        data = {
            "format": INDEX_FORMAT,
            "split": self.split,
            "kind": self.kind,
            "source": self.source,
            "num_samples": self.num_samples,
            "dropped": self.dropped,
            "shards": [vars(s) for s in self.shards],
        }
        path = index_path(directory, self.split)
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> ShardIndex:
        if not path.is_file():
            raise FileNotFoundError(
                f"shard index not found: {path} (write shards with `setdiv shards`)"
            )
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a JSON shard index: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{path}: not a setdiv shard index (format {found!r})")
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
            return cls(data["split"], data["kind"], data["source"], shards, data.get("dropped", 0))
        except KeyError as exc:
            raise UserError(f"{path}: malformed shard index: no {exc} entry") from None
        except TypeError as exc:
            raise UserError(f"{path}: malformed shard index: {exc}") from None


def index_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"{split}-index.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardSet:
    """Resolved shard paths with their index entries, in index order."""

    paths: list[Path]
    infos: list[ShardInfo]
    kind: str

    @classmethod
    def resolve(cls, pattern: str, kind: str | None = None) -> ShardSet:
        """Expand braces and globs; every shard must exist and be listed in its index, and
        hold `kind` samples ("regions" / "image") when given."""
        paths: list[Path] = []
        for part in braceexpand(pattern):
            matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
            if not matches:
                raise FileNotFoundError(f"no shard matches {part!r}")
            paths += [Path(m) for m in matches]
        indexes: dict[Path, ShardIndex] = {}
        infos, kinds = [], set()
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"missing shard: {p}")
            idx_file = index_path(p.parent, p.name.rsplit("-", 1)[0])
            if idx_file not in indexes:
                indexes[idx_file] = ShardIndex.load(idx_file)
            by_name = {s.name: s for s in indexes[idx_file].shards}
            if p.name not in by_name:
                raise UserError(f"shard {p} is not listed in {idx_file}")
            infos.append(by_name[p.name])
            kinds.add(indexes[idx_file].kind)
        if len(kinds) != 1:
            raise UserError(f"shards of different kinds in {pattern!r}: {sorted(kinds)}")
        if kind is not None and kind not in kinds:
            raise UserError(f"{pattern}: shards hold {kinds.pop()!r}, the model reads {kind!r}")
        return cls(paths, infos, kinds.pop())

    def verify(self, which: list[int] | None = None) -> None:
        """Compare sha256 of the chosen shards (default all) with the index; raise on mismatch."""
        for i in range(len(self.paths)) if which is None else which:
            digest = sha256_file(self.paths[i])
            if digest != self.infos[i].sha256:
                raise UserError(
                    f"checksum mismatch for shard {self.paths[i]}: index says "
                    f"{self.infos[i].sha256[:12]}..., file is {digest[:12]}..."
                )

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.infos)


def read_shard(path: str | Path, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """The raw samples of one shard ({"__key__", "__url__", ext: bytes}) through webdataset's
    `tarfile_to_samples`; an unreadable or truncated tar ends early, after `on_error(exc)`."""
    return wds.tarfile_to_samples(handler=on_error)([{"url": str(path)}])


def decode_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The `.json` entry of a raw sample; raises unless it holds 5 captions."""
    meta = json.loads(raw["json"])
    if len(meta["captions"]) != CAPTIONS_PER_IMAGE:
        raise ValueError(f"{len(meta['captions'])} captions")
    return meta


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(
    samples: Iterable[Sample],
    out: str | Path,
    split: str,
    kind: str,
    source: str,
    shard_size: int = 1000,
) -> ShardIndex:
    """Write `{split}-{i:06d}.tar` shards of `shard_size` samples and `{split}-index.json`.

    `samples` is consumed lazily, one shard in memory at most.
    """
    if shard_size < 1:
        raise UserError(f"shard size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = ShardIndex(split=split, kind=kind, source=source)
    for i, chunk in enumerate(_chunks(samples, shard_size)):
        path = out / f"{split}-{i:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for s in chunk:
                if len(s.captions) != CAPTIONS_PER_IMAGE:
                    raise UserError(f"image {s.image_id}: {len(s.captions)} captions, need 5")
                sink.write(s.to_wds())
        index.shards.append(ShardInfo(path.name, len(chunk), sha256_file(path)))
        log.info("wrote %s (%d samples)", path, len(chunk))
    index.save(out)
    return index
