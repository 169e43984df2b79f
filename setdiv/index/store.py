"""A search index over a gallery of embedding sets, on disk:

    INDEX/meta.json            format, modality, the export (path, sha256, config), the ANN
                               spec, K, D, element dtype, item count, parts, the shard sets
    INDEX/elements-00000.npy   (n, K, D) element sets of one appended part (fp16 or fp32)
    INDEX/items-00000.jsonl    its items, one line each: {"id": ..., "captions" | "text": ...}
    INDEX/ann-00001.faiss      FAISS index over the N*K elements of the first 1 part(s):
                               element e belongs to item e // K

An append writes the next part and the next ANN file, then `meta.json` (atomically), then
drops the previous ANN file: a crash at any point leaves the previous index whole.

The element matrix is what the exact rerank reads (memory-mapped); the ANN index only proposes
candidates. Nothing here executes code from a file: JSON, .npy without pickles, FAISS's own
binary format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from setdiv.errors import UserError

__all__ = ["FORMAT", "AnnSpec", "IndexMeta", "SetIndexStore"]

log = logging.getLogger(__name__)

FORMAT = "setdiv-index/1"
KINDS = ("flat", "ivf", "hnsw")
CODECS = ("flat", "fp16", "sq8")
"""Element codes inside the ANN index (besides `pq<M>`, M sub-quantizers)."""
TRAIN_SAMPLE = 100_000
"""Elements an IVF / SQ8 / PQ index is trained on (a random sample of the first part)."""


def _ann_name(parts: int) -> str:
    return f"ann-{parts:05d}.faiss"


def _faiss() -> Any:
    import faiss  # imported on use: only the index needs it

    return faiss


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
    sources: list[str] | None = None
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ann": asdict(self.ann)}, indent=1)

    @classmethod
    def from_json(cls, path: Path) -> IndexMeta:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise UserError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            return cls(**{**data, "ann": AnnSpec(**data["ann"])})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(f"{path}: not a setdiv index ({exc})") from None


class SetIndexStore:
    """An index directory: create it, append element sets, read elements back, search the
    ANN index. `SetIndexStore.open(path)` for an existing one."""

    def __init__(self, root: Path, meta: IndexMeta, ann: Any) -> None:
        self.root, self.meta, self.ann = root, meta, ann
        self._items: list[dict[str, Any]] | None = None
        self._parts = [
            np.load(root / f"elements-{i:05d}.npy", mmap_mode="r", allow_pickle=False)
            for i in range(meta.parts)
        ]
        self._starts = np.cumsum([0, *(p.shape[0] for p in self._parts)])
        self._configure()

    # --- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, meta: IndexMeta) -> SetIndexStore:
        root = Path(root)
        if (root / "meta.json").exists():
            raise UserError(f"{root} already holds an index")
        root.mkdir(parents=True, exist_ok=True)
        ann = _faiss().index_factory(meta.dim, meta.ann.factory(), _faiss().METRIC_INNER_PRODUCT)
        store = cls(root, meta, ann)
        store._write_meta()
        return store

    @classmethod
    def open(cls, root: str | Path) -> SetIndexStore:
        root = Path(root)
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(f"{root}: no index here (no meta.json; `setdiv index build`)")
        meta = IndexMeta.from_json(root / "meta.json")
        ann_path = root / _ann_name(meta.parts)
        if not ann_path.is_file():
            raise FileNotFoundError(f"{root}: {ann_path.name} is missing")
        try:
            ann = _faiss().read_index(str(ann_path))
        except RuntimeError as exc:
            raise UserError(f"{ann_path}: not a readable FAISS index ({exc})") from None
        if ann.ntotal != meta.count * meta.num_embeds:
            raise UserError(
                f"{root}: ann.faiss holds {ann.ntotal} elements, meta.json says "
                f"{meta.count} items x {meta.num_embeds}"
            )
        return cls(root, meta, ann)

    def _write_meta(self) -> None:
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(self.meta.to_json())
        tmp.replace(self.root / "meta.json")

    def _configure(self) -> None:
        faiss = _faiss()
        if self.meta.ann.kind == "ivf":
            faiss.extract_index_ivf(self.ann).nprobe = self.meta.ann.nprobe
        elif self.meta.ann.kind == "hnsw":
            self.ann.hnsw.efSearch = self.meta.ann.ef_search

    # --- writing --------------------------------------------------------------------------------

    def append(self, elements_NKD: Tensor, items: list[dict[str, Any]], source: str) -> None:
        """Add `elements_NKD` (one set per item, same K and D) with their items' ids/texts."""
        n, K, D = elements_NKD.shape
        if (K, D) != (self.meta.num_embeds, self.meta.dim):
            raise ValueError(
                f"element sets are {K} x {D}, the index holds {self.meta.num_embeds} x "
                f"{self.meta.dim}"
            )
        if len(items) != n:
            raise ValueError(f"{n} element sets but {len(items)} items")
        if n == 0:
            raise UserError(f"{source}: nothing to add (no readable item)")
        data = elements_NKD.detach().float().cpu().numpy()
        flat = np.ascontiguousarray(data.reshape(n * K, D), dtype=np.float32)
        if not self.ann.is_trained:
            rng = np.random.default_rng(0)
            sample = flat[rng.permutation(len(flat))[:TRAIN_SAMPLE]]
            log.info("training the %s index on %d elements", self.meta.ann.factory(), len(sample))
            self.ann.train(sample)
        self.ann.add(flat)
        index = self.meta.parts
        part = self.root / f"elements-{index:05d}.npy"
        np.save(part, data.astype(self.meta.dtype))
        with open(self.root / f"items-{index:05d}.jsonl", "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
        _faiss().write_index(self.ann, str(self.root / _ann_name(index + 1)))
        self.meta.count += n
        self.meta.parts += 1
        self.meta.sources = [*(self.meta.sources or []), source]
        self._write_meta()  # the commit point
        (self.root / _ann_name(index)).unlink(missing_ok=True)
        self._parts.append(np.load(part, mmap_mode="r", allow_pickle=False))
        self._starts = np.append(self._starts, self._starts[-1] + n)
        self._items = None

    # --- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.meta.count

    @property
    def items(self) -> list[dict[str, Any]]:
        if self._items is None:
            self._items = [
                json.loads(line)
                for i in range(self.meta.parts)
                for line in (self.root / f"items-{i:05d}.jsonl").read_text().splitlines()
            ]
        return self._items

    def elements(self, rows: np.ndarray | None = None) -> Tensor:
        """(n, K, D) float32 element sets of items `rows` (default: all), in that order."""
        if rows is None:
            rows = np.arange(len(self))
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self._starts, rows, side="right") - 1
        # Gathered in the stored dtype, widened by torch (numpy's fp16 -> fp32 is ~10x slower).
        shape = (len(rows), self.meta.num_embeds, self.meta.dim)
        out = np.empty(shape, dtype=self.meta.dtype)
        for p in np.unique(part):
            sel = part == p
            local = rows[sel] - self._starts[p]
            if len(local) == local[-1] - local[0] + 1 and (np.diff(local) == 1).all():
                out[sel] = self._parts[p][local[0] : local[-1] + 1]  # a range: one slice
                continue
            order = np.argsort(local)  # memory-mapped reads in file order
            out[np.flatnonzero(sel)[order]] = self._parts[p][local[order]]
        return torch.from_numpy(out).float()

    def candidates(self, queries_QLD: Tensor, per_element: int) -> list[np.ndarray]:
        """Per query, the items owning the top `per_element` elements of any of its elements
        by inner product (sorted item indices)."""
        Q, L, D = queries_QLD.shape
        flat = np.ascontiguousarray(queries_QLD.reshape(Q * L, D).float().cpu().numpy())
        _, ids = self.ann.search(flat, min(per_element, self.ann.ntotal))
        owners = ids.reshape(Q, -1) // self.meta.num_embeds
        return [np.unique(row[row >= 0]) for row in owners]
