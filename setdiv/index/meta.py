"""An index's description (`meta.json`): its format version, the ANN spec, what the gallery
holds. Checked on construction and on load, one line naming what is wrong."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from setdiv.errors import UserError

__all__ = [
    "CODECS",
    "DTYPES",
    "FORMAT",
    "KINDS",
    "MODALITIES",
    "TRAIN_SAMPLE",
    "AnnSpec",
    "IndexMeta",
]

FORMAT = "setdiv-index/2"
DTYPES = ("float16", "float32")
MODALITIES = ("image", "text")
KINDS = ("flat", "ivf", "hnsw")
CODECS = ("flat", "fp16", "sq8")
"""Element codes inside the ANN index (besides `pq<M>`, M sub-quantizers)."""
TRAIN_SAMPLE = 100_000
"""Elements an IVF / SQ8 / PQ index is trained on (a random sample of the first part)."""


@dataclass(frozen=True)
class AnnSpec:
    """Which FAISS index proposes the candidates."""

    kind: str = "flat"
    """flat (exact inner product) | ivf (inverted lists) | hnsw (graph)"""
    nlist: int = 1024
    """ivf: inverted lists (clusters)."""
    m: int = 32
    """hnsw: graph neighbours per node."""
    codec: str = "flat"
    """How elements are stored in the ANN index: flat | fp16 | sq8 | pq<M>."""
    nprobe: int = 32
    """ivf: lists visited per query element."""
    ef_search: int = 128
    """hnsw: candidate list size while searching."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"index kind must be one of {KINDS}, got {self.kind!r}")
        pq = self.codec.startswith("pq") and self.codec[2:].isdigit()
        if self.codec not in CODECS and not pq:
            raise UserError(f"index codec must be one of {CODECS} or pq<M>, got {self.codec!r}")
        for name in ("nlist", "m", "nprobe", "ef_search"):
            if getattr(self, name) < 1:
                raise UserError(f"index {name} must be >= 1, got {getattr(self, name)}")

    def factory(self) -> str:
        """The FAISS index_factory string."""
        codec = {"flat": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}.get(self.codec)
        codec = codec or f"PQ{self.codec[2:]}"
        if self.kind == "ivf":
            return f"IVF{self.nlist},{codec}"
        if self.kind == "hnsw":
            return f"HNSW{self.m},{codec}"
        return codec

    def check_width(self, dim: int) -> None:
        """Refuse a codec FAISS cannot build for `dim`-wide elements: pq<M> needs M to divide
        the width."""
        if not self.codec.startswith("pq"):
            return
        M = int(self.codec[2:])
        if M < 1 or dim % M:
            fits = [f"pq{m}" for m in range(1, dim + 1) if dim % m == 0 and m >= 4]
            raise UserError(
                f"--codec {self.codec}: pq<M> needs M to divide the element width {dim} "
                f"(this export's): e.g. {', '.join(fits[-4:])}"
            )

    def summary_factory(self, num_embeds: int, width: int) -> str:
        """The index over `width`-wide set summaries: the same kind, K times fewer IVF lists
        (one vector per set instead of K); pq<M> with the largest M' <= M dividing `width`."""
        codec = self.codec
        if codec.startswith("pq"):
            codec = f"pq{max(m for m in range(1, int(codec[2:]) + 1) if width % m == 0)}"
        nlist = max(1, self.nlist // num_embeds) if self.kind == "ivf" else self.nlist
        return replace(self, nlist=nlist, codec=codec).factory()


@dataclass
class IndexMeta:
    modality: str
    """What the gallery items are: image | text."""
    export_path: str
    export_sha256: str
    export_config: str
    """The export's config.yaml text: the model and similarity that made the elements."""
    ann: AnnSpec
    num_embeds: int
    dim: int
    dtype: str
    """float16 | float32: the stored element matrix."""
    count: int = 0
    parts: int = 0
    part_sizes: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    """sha256 of every shard whose items are in the index (an append of one is refused)."""
    format: str = FORMAT

    def __post_init__(self) -> None:
        ints = ("num_embeds", "dim", "count", "parts")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.num_embeds < 1 or self.dim < 1:
            raise ValueError(f"num_embeds and dim must be >= 1, got {self.num_embeds}, {self.dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        lists = (self.part_sizes, self.sources, self.shards)
        if not all(isinstance(x, list) for x in lists):
            raise ValueError("part_sizes, sources and shards must be lists")
        if len(self.part_sizes) != self.parts or sum(self.part_sizes) != self.count:
            raise ValueError(
                f"part_sizes {self.part_sizes} do not add up to {self.parts} parts of "
                f"{self.count} items"
            )

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ann": asdict(self.ann)}, indent=1)

    @classmethod
    def from_json(cls, path: Path) -> IndexMeta:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != FORMAT:
                raise ValueError(
                    f"format {data.get('format')!r}, expected {FORMAT!r} (an index of another "
                    "setdiv version: rebuild it with `setdiv index build`)"
                )
            if not isinstance(data.get("ann"), dict):
                raise ValueError("'ann' must be an object")
            return cls(**{**data, "ann": AnnSpec(**data["ann"])})
        except (OSError, ValueError, TypeError, KeyError, RecursionError, UserError) as exc:
            raise UserError(f"{path}: not a valid setdiv index ({exc})") from None
