"""WebDataset shards of image-caption samples, and the index file written next to them.

One sample per image:
  __key__     the image id as text
  .jpg        the image as JPEG bytes          (kind "image")
  .npy        its region features (R, C)       (kind "regions")
  .json       {"image_id", "captions": [5 str], "caption_ids": [5]}

Next to the shards `{split}-index.json` records, per shard, its name, sample count and sha256,
plus the source: the reader plans epochs from it without opening a tar, and verifies checksums.

img2dataset shards are read in place (`web_shards.py`). A shard is a local path or a URL
(`https://`, `s3://`, `pipe:CMD`: `remote.py`), its index read from next to it either way.
"""

from __future__ import annotations

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

from setdiv.data import remote
from setdiv.data.remote import DEFAULT_RETRY, Retry
from setdiv.data.web_shards import count_img2dataset, first_members, stats_path
from setdiv.errors import UserError

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "FORMATS",
    "Sample",
    "ShardIndex",
    "ShardInfo",
    "ShardSet",
    "decode_meta",
    "index_path",
    "read_shard",
    "sha256_file",
    "shard_index",
    "write_shards",
]

log = logging.getLogger(__name__)
CAPTIONS_PER_IMAGE = 5
INDEX_FORMAT = "setdiv-shards/1"
FORMATS = ("auto", "setdiv", "img2dataset")


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
    layout: str = "setdiv"
    """setdiv (5 captions per image) | features (`setdiv extract`: any caption count)."""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def save(self, directory: Path) -> Path:
        data = {
            "format": INDEX_FORMAT,
            "layout": self.layout,
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
    def load(cls, path: str | Path, retry: Retry = DEFAULT_RETRY) -> ShardIndex:
        """The index at `path` (a local path or a URL, `remote.py`)."""
        try:
            text = remote.read_bytes(path, retry)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shard index not found: {path} (write shards with `setdiv shards`)"
            ) from None
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a JSON shard index: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise UserError(f"{path}: not a setdiv shard index (format {found!r})")
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
            layout = data.get("layout", "setdiv")
            if layout not in ("setdiv", "features"):
                raise UserError(f"{path}: unknown shard layout {layout!r}")
            return cls(
                data["split"], data["kind"], data["source"], shards, data.get("dropped", 0), layout
            )
        except KeyError as exc:
            raise UserError(f"{path}: malformed shard index: no {exc} entry") from None
        except TypeError as exc:
            raise UserError(f"{path}: malformed shard index: {exc}") from None


def index_path(directory: Path, split: str) -> Path:
    return Path(directory) / f"{split}-index.json"


def shard_index(shard: str) -> str:
    """The location of the index listing `shard` (`{split}-index.json` next to it, split
    being the shard's name before its last dash)."""
    return remote.sibling(shard, f"{remote.name(shard).rsplit('-', 1)[0]}-index.json")


def sha256_file(path: str | Path, chunk: int = 1 << 22, retry: Retry = DEFAULT_RETRY) -> str:
    h = hashlib.sha256()
    with remote.open_stream(path, retry) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardSet:
    """Resolved shard locations (local paths or URLs, `remote.py`) with their index entries,
    in index order."""

    paths: list[str]
    infos: list[ShardInfo]
    kind: str
    format: str = "setdiv"
    """setdiv | img2dataset | features (`setdiv extract` output)."""
    retry: Retry = field(default_factory=Retry)
    """How reads of remote shards are retried."""

    @classmethod
    def resolve(
        cls, pattern: str, kind: str | None = None, fmt: str = "setdiv",
        caption_key: str | None = None, retry: Retry | None = None,
    ) -> ShardSet:  # fmt: skip
        """Expand braces and globs; every shard must be listed in its index (and exist, when
        local), and hold `kind` samples ("regions" / "image") when given. `fmt` img2dataset:
        shards read in place (image kind, counted as `count_img2dataset` can); auto: setdiv
        where an index lies next to the first shard, img2dataset where none does and the
        first shard with members holds `.txt` captions (or `caption_key` names the `.json`
        field that does)."""
        if fmt not in FORMATS:
            raise UserError(f"shard format must be one of {FORMATS}, got {fmt!r}")
        retry = retry or Retry()
        paths = cls.expand(pattern)
        missing = [p for p in paths if not remote.is_remote(p) and not Path(p).is_file()]
        if missing:  # (a brace list names shards whether they exist or not)
            raise FileNotFoundError(f"missing shard: {missing[0]}")
        if fmt == "auto":
            fmt = _detect_format(paths, kind, caption_key, retry)
        if fmt == "img2dataset":
            if kind not in (None, "image"):
                raise UserError(
                    f"{pattern}: img2dataset shards hold images, the model reads {kind!r}"
                )
            infos = [ShardInfo(remote.name(p), count_img2dataset(p, retry), "") for p in paths]
            return cls(paths, infos, "image", "img2dataset", retry)
        indexes: dict[str, ShardIndex] = {}
        infos, kinds, layouts = [], set(), set()
        for p in paths:
            idx_file = shard_index(p)
            if idx_file not in indexes:
                indexes[idx_file] = ShardIndex.load(idx_file, retry)
            by_name = {s.name: s for s in indexes[idx_file].shards}
            if remote.name(p) not in by_name:
                raise UserError(f"shard {p} is not listed in {idx_file}")
            infos.append(by_name[remote.name(p)])
            kinds.add(indexes[idx_file].kind)
            layouts.add(indexes[idx_file].layout)
        if len(kinds) != 1:
            raise UserError(f"shards of different kinds in {pattern!r}: {sorted(kinds)}")
        if kind is not None and kind not in kinds:
            raise UserError(f"{pattern}: shards hold {kinds.pop()!r}, the model reads {kind!r}")
        if len(layouts) != 1:
            raise UserError(f"shards of different layouts in {pattern!r}: {sorted(layouts)}")
        return cls(paths, infos, kinds.pop(), layouts.pop(), retry)

    @staticmethod
    def expand(pattern: str) -> list[str]:
        """The shard locations of a brace pattern / glob, in order; a part matching nothing
        is an error naming it."""
        return [m for part in braceexpand(pattern) for m in remote.expand_part(part)]

    def verify(self, which: list[int] | None = None) -> None:
        """Compare sha256 of the chosen local shards (default all) with the index; raise on
        mismatch. img2dataset shards have no checksums, and remote shards are not read
        twice (once to hash, once to train): nothing to compare."""
        if self.format == "img2dataset":
            return
        for i in range(len(self.paths)) if which is None else which:
            if remote.is_remote(self.paths[i]):
                continue
            digest = sha256_file(self.paths[i])
            if digest != self.infos[i].sha256:
                raise UserError(
                    f"checksum mismatch for shard {self.paths[i]}: index says "
                    f"{self.infos[i].sha256[:12]}..., file is {digest[:12]}..."
                )

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.infos)

    def sha256s(self) -> list[str]:
        """Each shard's sha256: the index's, or (img2dataset shards, which have none) the
        file's, computed now (a remote one streamed once)."""
        return [
            i.sha256 or sha256_file(p, retry=self.retry)
            for p, i in zip(self.paths, self.infos, strict=True)
        ]


def read_shard(
    path: str | Path, on_error: Callable[[Exception], bool], retry: Retry = DEFAULT_RETRY
) -> Iterator[dict]:
    """The raw samples of one shard ({"__key__", "__url__", ext: bytes}) through webdataset's
    tar expansion and grouping; a remote shard is streamed with retries (`remote.py`). An
    unreadable or truncated tar ends early, after `on_error(exc)`."""
    url = str(path)
    try:
        stream = remote.open_stream(url, retry)
    except Exception as exc:  # noqa: BLE001 -- the handler decides, as webdataset's opener would
        on_error(exc)
        return iter(())
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
    return wds.tariterators.group_by_keys(files, handler=on_error)


def _detect_format(
    paths: list[str], kind: str | None, caption_key: str | None, retry: Retry
) -> str:
    """`format: auto`: setdiv where `{split}-index.json` lies next to the first shard;
    img2dataset where none does and the first shard with members holds `.txt` captions (or
    `caption_key` is set, or img2dataset's `_stats.json` lies next to it); otherwise an
    error naming what was looked for."""
    first = paths[0]
    index = shard_index(first)
    if remote.exists(index) or kind not in (None, "image"):
        return "setdiv"  # (a region-feature reader: setdiv shards or none)
    if caption_key is not None or remote.exists(stats_path(first)):
        return "img2dataset"
    members: list[str] = []
    for path in paths:  # (an empty shard says nothing: look at the next)
        members = first_members(path, retry)
        if members:
            break
    if any(m.endswith(".txt") for m in members):
        return "img2dataset"
    seen = ", ".join(members[:6]) or "no members in any shard"
    raise UserError(
        f"{first}: cannot tell the shard format (data.format=auto): no shard index {index} "
        f"next to it (setdiv shards) and no .txt captions among the first members of "
        f"{path} (img2dataset; seen: {seen}). Captions in each sample's .json: set "
        "data.format=img2dataset and data.caption_key=<its field>"
    )


def decode_meta(raw: dict[str, Any], five: bool = True) -> dict[str, Any]:
    """The `.json` entry of a raw sample; raises unless it holds 5 captions (`five`), or at
    least one."""
    meta = json.loads(raw["json"])
    count = len(meta["captions"])
    if (five and count != CAPTIONS_PER_IMAGE) or count < 1:
        raise ValueError(f"{count} captions")
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
