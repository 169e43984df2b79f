"""A search index over a gallery of embedding sets, on disk:

    INDEX/meta.json            format, modality, the export (path, sha256, config), the ANN
                               spec, K, D, element dtype, item count, parts, the shard sets
    INDEX/elements-00000.npy   (n, K, D) element sets of one appended part (fp16 or fp32)
    INDEX/items-00000.jsonl    its items, one line each: {"id": ..., "captions" | "text": ...}
    INDEX/ann-00001.faiss      FAISS index over the N*K elements of the first 1 part(s):
                               element e belongs to item e // K
    INDEX/summary-00001.faiss  FAISS index over the N set summaries (`summary.set_summaries`): the
                               adaptive search's candidates
    INDEX/projection.npy       (D, r) the summaries' projection (fixed by the first append)

An append writes the next part and the next ANN files, then `meta.json` (atomically), then
drops the previous ANN files: a crash at any point leaves the previous index whole. Opening
checks every file against `meta.json` (dtype, shapes, counts) and fails in one line naming the
file; elements that are not finite are refused at append, naming the item.

The element matrix is what the exact rerank reads (memory-mapped); the ANN index only proposes
candidates. Nothing here executes code from a file: JSON, .npy without pickles, FAISS's own
binary format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from setdiv.errors import UserError
from setdiv.index.meta import (
    FORMAT,
    TRAIN_SAMPLE,
    AnnSpec,
    IndexMeta,
)
from setdiv.index.summary import principal_directions, set_summaries

__all__ = ["FORMAT", "AnnSpec", "IndexMeta", "SetIndexStore"]

log = logging.getLogger(__name__)


def _ann_name(parts: int, what: str = "ann") -> str:
    return f"{what}-{parts:05d}.faiss"


def _faiss() -> Any:
    import faiss  # imported on use: only the index needs it

    return faiss


def _load_part(path: Path, rows: int, meta: IndexMeta) -> np.ndarray:
    """One element part, memory-mapped, checked against `meta` (one line naming the file)."""
    try:
        part = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: not a readable element file ({exc})") from None
    want = (rows, meta.num_embeds, meta.dim)
    if part.shape != want or part.dtype != np.dtype(meta.dtype):
        raise UserError(
            f"{path}: holds {part.dtype} {part.shape}, meta.json says {meta.dtype} {want}"
        )
    return part


class SetIndexStore:
    """An index directory: create it, append element sets, read elements back, search the
    ANN indexes. `SetIndexStore.open(path)` for an existing one."""

    def __init__(
        self, root: Path, meta: IndexMeta, ann: Any, summary: Any, projection: Tensor | None
    ) -> None:
        self.root, self.meta, self.ann, self.summary = root, meta, ann, summary
        self.projection = projection
        """(D, r) the summaries' projection; None until the first append."""
        self._items: list[dict[str, Any]] | None = None
        self._parts = [
            _load_part(root / f"elements-{i:05d}.npy", n, meta)
            for i, n in enumerate(meta.part_sizes)
        ]
        self._starts = np.cumsum([0, *meta.part_sizes])
        self._configure()

    # --- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, meta: IndexMeta) -> SetIndexStore:
        root = Path(root)
        if (root / "meta.json").exists():
            raise UserError(f"{root} already holds an index")
        meta.ann.check_width(meta.dim)
        faiss = _faiss()
        ann = faiss.index_factory(meta.dim, meta.ann.factory(), faiss.METRIC_INNER_PRODUCT)
        root.mkdir(parents=True, exist_ok=True)  # (after everything that can refuse)
        store = cls(root, meta, ann, None, None)
        store._write_meta()
        return store

    @classmethod
    def open(cls, root: str | Path) -> SetIndexStore:
        root = Path(root)
        if not (root / "meta.json").is_file():
            raise FileNotFoundError(f"{root}: no index here (no meta.json; `setdiv index build`)")
        meta = IndexMeta.from_json(root / "meta.json")
        ann = cls._read_ann(root / _ann_name(meta.parts), meta.count * meta.num_embeds, meta.dim)
        if meta.parts == 0:
            return cls(root, meta, ann, None, None)
        path = root / "projection.npy"
        try:
            P = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise UserError(f"{path}: not a readable projection ({exc})") from None
        if P.ndim != 2 or P.shape[0] != meta.dim or P.dtype != np.float32:
            raise UserError(f"{path}: holds {P.dtype} {P.shape}, expected float32 ({meta.dim}, r)")
        width = meta.dim + P.shape[1] * (P.shape[1] + 1)
        summary = cls._read_ann(root / _ann_name(meta.parts, "summary"), meta.count, width)
        return cls(root, meta, ann, summary, torch.from_numpy(P))

    @staticmethod
    def _read_ann(path: Path, ntotal: int, dim: int) -> Any:
        if not path.is_file():
            raise UserError(f"{path.parent}: {path.name} is missing")
        try:
            ann = _faiss().read_index(str(path))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][:200]
            raise UserError(f"{path}: not a readable FAISS index ({reason})") from None
        if ann.ntotal != ntotal or ann.d != dim:
            raise UserError(
                f"{path}: holds {ann.ntotal} vectors of width {ann.d}; meta.json implies "
                f"{ntotal} of width {dim}"
            )
        return ann

    def _write_meta(self) -> None:
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(self.meta.to_json())
        tmp.replace(self.root / "meta.json")

    def _configure(self) -> None:
        faiss = _faiss()
        for ann in (self.ann, self.summary):
            if ann is None:
                continue
            if self.meta.ann.kind == "ivf":
                faiss.extract_index_ivf(ann).nprobe = self.meta.ann.nprobe
            elif self.meta.ann.kind == "hnsw":
                ann.hnsw.efSearch = self.meta.ann.ef_search

    # --- writing --------------------------------------------------------------------------------

    def append(
        self,
        elements_NKD: Tensor,
        items: list[dict[str, Any]],
        source: str,
        shards: list[str] | None = None,
    ) -> None:
        """Add `elements_NKD` (one set per item, same K and D) with their items' records;
        `shards`: sha256 of the shards they come from (refused when already in the index)."""
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
        self.check_new_shards(shards or [], source)
        data = elements_NKD.detach().float().cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(data).reshape(n, -1).all(axis=1))
        if len(bad):
            ids = [items[i].get("id", i) for i in bad[:3]]
            raise UserError(
                f"{source}: {len(bad)} item(s) have non-finite elements (NaN or inf), e.g. "
                f"{ids}: the export or its inputs are broken; nothing was added"
            )
        flat = np.ascontiguousarray(data.reshape(n * K, D), dtype=np.float32)
        if self.projection is None:
            P = principal_directions(flat)
            np.save(self.root / "projection.npy", P)
            self.projection = torch.from_numpy(P)
            width = D + P.shape[1] * (P.shape[1] + 1)
            self.summary = _faiss().index_factory(
                width, self.meta.ann.summary_factory(K, width), _faiss().METRIC_INNER_PRODUCT
            )
            self._configure()
        summaries = set_summaries(torch.from_numpy(data), self.projection).numpy()
        for ann, vectors in ((self.ann, flat), (self.summary, summaries)):
            if not ann.is_trained:
                rng = np.random.default_rng(0)
                sample = vectors[rng.permutation(len(vectors))[:TRAIN_SAMPLE]]
                log.info("training an index on %d vectors", len(sample))
                ann.train(sample)
            ann.add(vectors)
        index = self.meta.parts
        part = self.root / f"elements-{index:05d}.npy"
        np.save(part, data.astype(self.meta.dtype))
        with open(self.root / f"items-{index:05d}.jsonl", "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
        _faiss().write_index(self.ann, str(self.root / _ann_name(index + 1)))
        _faiss().write_index(self.summary, str(self.root / _ann_name(index + 1, "summary")))
        self.meta.count += n
        self.meta.parts += 1
        self.meta.part_sizes = [*self.meta.part_sizes, n]
        self.meta.sources = [*self.meta.sources, source]
        self.meta.shards = [*self.meta.shards, *(shards or [])]
        self._write_meta()  # the commit point
        for what in ("ann", "summary"):
            (self.root / _ann_name(index, what)).unlink(missing_ok=True)
        self._parts.append(_load_part(part, n, self.meta))
        self._starts = np.append(self._starts, self._starts[-1] + n)
        self._items = None

    def check_new_shards(self, shards: list[str], source: str) -> None:
        """Refuse shards (sha256) whose items the index already holds."""
        again = set(shards) & set(self.meta.shards)
        if again:
            raise UserError(
                f"{source}: {len(again)} shard(s) are already in {self.root} (same sha256): "
                "their items would appear twice"
            )

    # --- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.meta.count

    @property
    def items(self) -> list[dict[str, Any]]:
        """Every item's record, in index order (read on first use, checked line by line)."""
        if self._items is None:
            self._items = []
            for i, rows in enumerate(self.meta.part_sizes):
                self._items += _read_items(self.root / f"items-{i:05d}.jsonl", rows)
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

    def element_search(self, queries_QLD: Tensor, per_element: int) -> tuple[Tensor, Tensor]:
        """Per query element the `per_element` nearest gallery elements by inner product:
        (Q, L, n) scores (best first) and (Q, L, n) owning items (-1: none)."""
        Q, L, D = queries_QLD.shape
        flat = np.ascontiguousarray(queries_QLD.reshape(Q * L, D).float().cpu().numpy())
        scores, ids = self.ann.search(flat, min(per_element, self.ann.ntotal))
        owners = np.where(ids >= 0, ids // self.meta.num_embeds, -1)
        return torch.from_numpy(scores).view(Q, L, -1), torch.from_numpy(owners).view(Q, L, -1)

    def summary_search(self, summaries_QS: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """The `n` items whose set summaries have the largest inner product with each query's
        (`query_summaries`): (Q, n) scores, best first, and (Q, n) items (-1: none)."""
        if self.summary is None:
            raise UserError(f"{self.root}: the index is empty")
        flat = np.ascontiguousarray(summaries_QS.float().cpu().numpy())
        scores, ids = self.summary.search(flat, min(n, self.summary.ntotal))
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def candidates(self, queries_QLD: Tensor, per_element: int) -> list[np.ndarray]:
        """Per query, the items owning the top `per_element` elements of any of its elements
        by inner product (sorted item indices)."""
        _, owners = self.element_search(queries_QLD, per_element)
        return [np.unique(row[row >= 0]) for row in owners.flatten(1).numpy()]


def _read_items(path: Path, rows: int) -> list[dict[str, Any]]:
    """The item records of one part: `rows` JSON objects, one per line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not readable ({exc})") from None
    if len(lines) != rows:
        raise UserError(f"{path}: {len(lines)} lines, meta.json says {rows} items")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise UserError(f"{path}:{n}: not a JSON item ({str(exc)[:80]})") from None
        if not isinstance(item, dict) or "id" not in item:
            raise UserError(f"{path}:{n}: an item must be a JSON object with an 'id'")
        out.append(item)
    return out
