"""A gallery held as several index shards and searched as one.

    INDEX/shard-000/   an index (`setdiv index build --out INDEX/shard-000 ...`)
    INDEX/shard-001/   another, built with the same export over other data shards
    ...

Gallery row r of shard s is row `offset[s] + r` of the whole, in shard order: the rows an
index built over all the data shards in the same order would give them. Each shard answers
its own top-k (`IndexShard.search`, in this process or in a Ray Serve replica); the router
(`ShardedSearcher`) merges them by score, ties to the lower row (`search.top_rows`, which
every search of a single index also uses), so the merged top-k is the single index's.
A shard that does not answer (its replica being restarted) fails the whole query with
`ShardUnavailableError` (HTTP 503), never a partial answer. docs/search.md "Sharded index".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from setdiv.errors import UserError
from setdiv.index.meta import IndexMeta
from setdiv.index.search import AUTO, Hits, SetSearcher, top_rows

__all__ = [
    "IndexShard",
    "ShardUnavailableError",
    "ShardedSearcher",
    "ShardedStore",
    "local_shards",
    "open_searcher",
    "shard_dirs",
]

log = logging.getLogger(__name__)
SHARD_PREFIX = "shard-"
EXACT = "exact"
"""`candidates` value asking a shard for brute-force search (`SetSearcher.exact`)."""


class ShardUnavailableError(RuntimeError):
    """A shard did not answer in time (its replica died or is restarting): no answer is
    given rather than one from the other shards only."""


def shard_dirs(index: str | Path) -> list[Path]:
    """The index shards of a sharded index directory, in order; an error naming the
    directory if it holds none."""
    root = Path(index)
    found = sorted(p for p in root.glob(f"{SHARD_PREFIX}*") if (p / "meta.json").is_file())
    if not found:
        raise UserError(
            f"{root}: no index shards ({SHARD_PREFIX}*/meta.json): build each with "
            f"`setdiv index build ... --out {root}/{SHARD_PREFIX}000`"
        )
    return found


class IndexShard:
    """One index shard with its searcher: what a Ray Serve replica (or the router itself,
    without Ray) holds. Answers in numpy, ready to cross a process boundary."""

    def __init__(self, path: str | Path, export: str | Path | None = None) -> None:
        self.searcher = SetSearcher(path, export)

    def size(self) -> int:
        return len(self.searcher.store)

    def items(self) -> list[dict[str, Any]]:
        return self.searcher.store.items

    def search(self, queries_QLD: np.ndarray, k: int, candidates: int | str) -> dict[str, Any]:
        """This shard's top-k: {"scores", "rows" (Q, k') local rows, "candidates",
        "rounds"}; `candidates` "exact" searches by brute force."""
        queries = torch.from_numpy(queries_QLD)
        with torch.no_grad():
            if candidates == EXACT:
                hits = self.searcher.exact(queries, k)
            else:
                hits = self.searcher.search(queries, k, candidates)
        return {
            "scores": hits.scores.numpy(), "rows": hits.items.numpy(),
            "candidates": hits.candidates, "rounds": hits.rounds,
        }  # fmt: skip


@dataclass
class ShardedStore:
    """What the service reads of a store, for the whole sharded gallery."""

    meta: IndexMeta
    items: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.items)


Search = Callable[[np.ndarray, int, "int | str"], dict[str, Any]]


class ShardedSearcher(SetSearcher):
    """`SetSearcher`'s interface over index shards: queries are encoded here with the export
    all shards were built with; searches fan out to `searches` (one callable per shard, in
    shard order) and their answers merge."""

    def __init__(
        self, index: str | Path, searches: Sequence[Search], items: Sequence[list[dict]],
        export: str | Path | None = None,
    ) -> None:  # fmt: skip
        dirs = shard_dirs(index)
        if len(dirs) != len(searches) or len(items) != len(searches):
            raise ValueError(f"{len(dirs)} shards, {len(searches)} searches, {len(items)} items")
        metas = [IndexMeta.from_json(d / "meta.json") for d in dirs]
        for d, m in zip(dirs[1:], metas[1:], strict=True):
            if (m.export_sha256, m.modality) != (metas[0].export_sha256, metas[0].modality):
                raise UserError(
                    f"{d} holds {m.modality} items of export {m.export_sha256[:12]}..., "
                    f"{dirs[0]} {metas[0].modality} items of {metas[0].export_sha256[:12]}...: "
                    "the shards of one index share the export and the modality"
                )
        self._load_model(metas[0], dirs[0], export)
        self.searches = list(searches)
        sizes = [len(x) for x in items]
        self.offsets = np.cumsum([0, *sizes[:-1]]).tolist()
        self.store = ShardedStore(metas[0], [it for part in items for it in part])  # type: ignore[assignment]
        self._pool = ThreadPoolExecutor(len(searches), "setdiv-shard")

    def _fan_out(self, queries: Tensor, k: int, candidates: int | str) -> Hits:
        payload = queries.float().numpy()
        futures = [self._pool.submit(f, payload, k, candidates) for f in self.searches]
        parts = []
        for n, future in enumerate(futures):
            try:
                parts.append(future.result())
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 -- a dead or restarting replica, a timeout
                raise ShardUnavailableError(
                    f"index shard {n} did not answer ({type(exc).__name__}): retry shortly"
                ) from exc
        total = len(self.store)
        scores = torch.cat([torch.from_numpy(p["scores"]) for p in parts], dim=1)
        local = [torch.from_numpy(p["rows"]) for p in parts]
        shifted = [  # (a shard's empty slots, row -1, rank after every real row)
            torch.where(r >= 0, r + off, total) for r, off in zip(local, self.offsets, strict=True)
        ]
        rows = torch.cat(shifted, dim=1)
        best_s, best_i = top_rows(scores, rows, min(k, total))
        best_i = torch.where(best_i < total, best_i, -1)
        rounds = [p["rounds"] for p in parts]
        return Hits(
            best_s,
            best_i,
            [sum(c) for c in zip(*(p["candidates"] for p in parts), strict=True)],
            None if None in rounds else [max(r) for r in zip(*rounds, strict=True)],
        )

    def search(self, queries: Tensor, k: int = 10, candidates: int | str = AUTO) -> Hits:
        if candidates != AUTO and (not isinstance(candidates, int) or isinstance(candidates, bool)):
            raise UserError(f"candidates must be 'auto' or an integer, got {candidates!r}")
        return self._fan_out(queries, k, candidates)

    def exact(self, queries: Tensor, k: int = 10) -> Hits:
        return self._fan_out(queries, k, EXACT)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def local_shards(index: str | Path, export: str | Path | None = None) -> ShardedSearcher:
    """A sharded index searched in this process (every shard loaded here): the reference the
    Ray Serve deployment is checked against, and `setdiv serve` on a sharded index without
    --ray."""
    shards = [IndexShard(d, export) for d in shard_dirs(index)]
    return ShardedSearcher(index, [s.search for s in shards], [s.items() for s in shards], export)


def open_searcher(index: str | Path, export: str | Path | None = None) -> SetSearcher:
    """The searcher of an index directory: one index, or (`shard-*/` inside) its shards,
    searched in this process."""
    if (Path(index) / "meta.json").is_file() or not any(Path(index).glob(f"{SHARD_PREFIX}*")):
        return SetSearcher(index, export)
    return local_shards(index, export)
