"""WebDataset shards of image-caption samples, and the index file written next to them.

One sample per image:
  __key__     the image id as text
  .jpg        the image as JPEG bytes          (kind "image")
  .npy        its region features (R, C)       (kind "regions")
  .json       {"image_id", "captions": [5 str], "caption_ids": [5]}

Next to the shards `{split}-index.json` records, per shard, its name, sample count and sha256,
plus the source: the reader plans epochs from it without opening a tar, and verifies checksums.

img2dataset shards (CC3M, CC12M, LAION, DataComp, as img2dataset writes them) are read in
place: `KEY.jpg`, `KEY.txt` (one caption), `KEY.json` (metadata with a `status`). They have no
index: their sample counts come from the tar headers (`scan_img2dataset`) and there is no
checksum to verify.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import tarfile
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
    "FORMATS",
    "Sample",
    "ShardIndex",
    "ShardInfo",
    "ShardSet",
    "decode_meta",
    "index_path",
    "read_shard",
    "scan_img2dataset",
    "sha256_file",
    "web_meta",
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
    format: str = "setdiv"
    """setdiv | img2dataset | features (`setdiv extract` output)."""

    @classmethod
    def resolve(
        cls, pattern: str, kind: str | None = None, fmt: str = "setdiv",
        caption_key: str | None = None,
    ) -> ShardSet:  # fmt: skip
        """Expand braces and globs; every shard must exist and be listed in its index, and
        hold `kind` samples ("regions" / "image") when given. `fmt` img2dataset: shards read
        in place (image kind, counted from their tar headers); auto: setdiv where an index
        lies next to the first shard, img2dataset where none does and the first shard with
        members holds `.txt` captions (or `caption_key` names the `.json` field that does)."""
        if fmt not in FORMATS:
            raise UserError(f"shard format must be one of {FORMATS}, got {fmt!r}")
        paths = cls.expand(pattern)
        missing = [p for p in paths if not p.is_file()]
        if missing:  # (a brace list names shards whether they exist or not)
            raise FileNotFoundError(f"missing shard: {missing[0]}")
        if fmt == "auto":
            fmt = _detect_format(paths, kind, caption_key)
        if fmt == "img2dataset":
            if kind not in (None, "image"):
                raise UserError(
                    f"{pattern}: img2dataset shards hold images, the model reads {kind!r}"
                )
            return cls(paths, [scan_img2dataset(p) for p in paths], "image", "img2dataset")
        indexes: dict[Path, ShardIndex] = {}
        infos, kinds, layouts = [], set(), set()
        for p in paths:
            idx_file = index_path(p.parent, p.name.rsplit("-", 1)[0])
            if idx_file not in indexes:
                indexes[idx_file] = ShardIndex.load(idx_file)
            by_name = {s.name: s for s in indexes[idx_file].shards}
            if p.name not in by_name:
                raise UserError(f"shard {p} is not listed in {idx_file}")
            infos.append(by_name[p.name])
            kinds.add(indexes[idx_file].kind)
            layouts.add(indexes[idx_file].layout)
        if len(kinds) != 1:
            raise UserError(f"shards of different kinds in {pattern!r}: {sorted(kinds)}")
        if kind is not None and kind not in kinds:
            raise UserError(f"{pattern}: shards hold {kinds.pop()!r}, the model reads {kind!r}")
        if len(layouts) != 1:
            raise UserError(f"shards of different layouts in {pattern!r}: {sorted(layouts)}")
        return cls(paths, infos, kinds.pop(), layouts.pop())

    @staticmethod
    def expand(pattern: str) -> list[Path]:
        """The shard paths of a brace pattern / glob, in order; a part matching nothing is an
        error naming it."""
        paths: list[Path] = []
        for part in braceexpand(pattern):
            matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
            if not matches:
                raise FileNotFoundError(f"no shard matches {part!r}")
            paths += [Path(m) for m in matches]
        return paths

    def verify(self, which: list[int] | None = None) -> None:
        """Compare sha256 of the chosen shards (default all) with the index; raise on mismatch.
        img2dataset shards have no checksums: nothing to compare."""
        if self.format == "img2dataset":
            return
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

    def sha256s(self) -> list[str]:
        """Each shard's sha256: the index's, or (img2dataset shards, which have none) the
        file's, computed now."""
        return [i.sha256 or sha256_file(p) for p, i in zip(self.paths, self.infos, strict=True)]


def read_shard(path: str | Path, on_error: Callable[[Exception], bool]) -> Iterator[dict]:
    """The raw samples of one shard ({"__key__", "__url__", ext: bytes}) through webdataset's
    `tarfile_to_samples`; an unreadable or truncated tar ends early, after `on_error(exc)`."""
    return wds.tarfile_to_samples(handler=on_error)([{"url": str(path)}])


def _detect_format(paths: list[Path], kind: str | None, caption_key: str | None) -> str:
    """`format: auto`: setdiv where `{split}-index.json` lies next to the first shard;
    img2dataset where none does and the first shard with members holds `.txt` captions (or
    `caption_key` is set); otherwise an error naming what was looked for."""
    first = paths[0]
    index = index_path(first.parent, first.name.rsplit("-", 1)[0])
    if index.is_file() or kind not in (None, "image"):
        return "setdiv"  # (a region-feature reader: setdiv shards or none)
    if caption_key is not None:
        return "img2dataset"
    members: list[str] = []
    for path in paths:  # (an empty shard says nothing: look at the next)
        members = _first_members(path)
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


def _first_members(path: Path, look: int = 16) -> list[str]:
    """The names of the first `look` file members of a tar (none if unreadable)."""
    names: list[str] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    names.append(member.name)
                if len(names) >= look:
                    break
    except (OSError, tarfile.TarError, EOFError):
        pass
    return names


def scan_img2dataset(path: Path) -> ShardInfo:
    """A shard's sample count from its tar headers (webdataset's grouping: members sharing the
    name before the first dot of their file name form one sample). An unreadable tar counts
    what could be read; the reader then skips and counts the rest."""
    keys, last = 0, None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, _, name = member.name.rpartition("/")
                key = f"{head}/{name.split('.', 1)[0]}"
                if key != last:
                    keys, last = keys + 1, key
    except (OSError, tarfile.TarError, EOFError) as exc:
        log.warning("%s: unreadable after %d samples (%s)", path, keys, exc)
    return ShardInfo(path.name, keys, "")


def web_meta(raw: dict[str, Any], caption_key: str | None = None) -> dict[str, Any]:
    """The meta of an img2dataset sample: its one caption (from `.txt`, or the `.json` field
    `caption_key`), id = key; raises for a failed download, a missing or empty caption, or an
    image that is missing or not a JPEG."""
    info = json.loads(raw["json"]) if "json" in raw else {}
    if not isinstance(info, dict):
        raise ValueError("its .json is not an object")
    if info.get("status", "success") != "success":
        raise ValueError(f"download status {info.get('status')!r}")
    if caption_key is not None:
        caption = info.get(caption_key)
        if not isinstance(caption, str):
            raise ValueError(f"no caption string in .json field {caption_key!r}")
    elif "txt" in raw:
        caption = raw["txt"].decode("utf-8")
    else:
        raise ValueError("no .txt caption")
    if not caption.strip():
        raise ValueError("an empty caption")
    if raw.get("jpg", b"")[:3] != b"\xff\xd8\xff":
        raise ValueError("no JPEG image (.jpg missing or not JPEG data)")
    key = raw["__key__"]
    return {"image_id": key, "captions": [caption.strip()], "caption_ids": [key]}


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
