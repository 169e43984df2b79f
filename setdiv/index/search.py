"""Two-stage search over an index of embedding sets: ANN candidates, then the exact set
similarity of the export (smooth-Chamfer, ...) over the union of their items.

Two ways to choose the candidates:
  auto (the default)  `adaptive_top_k`: rounds of candidates from both ANN indexes (set
                      summaries and elements), doubling until the k-th exact score beats a bound
                      on every item not yet scored (see there); the budget is per query.
  an integer C        `two_stage_top_k`: the items owning the C nearest elements of each query
                      element, in one round.

Shape legend: Q queries, L query set size, N gallery items, K gallery set size, D width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from setdiv.api import SetModel
from setdiv.errors import UserError
from setdiv.export import ExportedModel, load_exported
from setdiv.index.meta import IndexMeta
from setdiv.index.store import SetIndexStore
from setdiv.index.summary import query_summaries, set_summaries
from setdiv.similarity import build_similarity

__all__ = [
    "AUTO",
    "AutoBudget",
    "Hits",
    "SetSearcher",
    "adaptive_top_k",
    "exact_top_k",
    "top_rows",
    "two_stage_top_k",
]

AUTO = "auto"


@dataclass
class Hits:
    """Top-k results of Q queries, best first."""

    scores: Tensor
    """(Q, k) set similarities."""
    items: Tensor
    """(Q, k) gallery item indices."""
    candidates: list[int]
    """Per query, how many items were re-scored exactly."""
    rounds: list[int] | None = None
    """Per query, candidate rounds of the adaptive search (None: one fixed round)."""


def _score(similarity: Any, modality: str, queries_QLD: Tensor, gallery_NKD: Tensor) -> Tensor:
    """(Q, N) similarities of query sets to gallery sets; the image side is always the
    similarity's first argument. A score that is not finite (a broken gallery set) is -inf:
    it can never rank above a real one."""
    if modality == "image":  # gallery images, text queries
        s = similarity(gallery_NKD, queries_QLD).T
    else:
        s = similarity(queries_QLD, gallery_NKD)
    return torch.where(torch.isfinite(s), s, -torch.inf)


def top_rows(scores_QN: Tensor, rows_QN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best (score, row) of each query: score descending, ties by the lower gallery row,
    so that a search over parts of a gallery merges into the answer of the whole (`sharded`)."""
    by_row = torch.argsort(rows_QN, dim=1, stable=True)
    s, r = torch.gather(scores_QN, 1, by_row), torch.gather(rows_QN, 1, by_row)
    best = torch.sort(s, dim=1, descending=True, stable=True)
    return best.values[:, :k], torch.gather(r, 1, best.indices[:, :k])


def exact_top_k(
    store: SetIndexStore, similarity: Any, queries_QLD: Tensor, k: int, chunk: int = 65536
) -> Hits:
    """Brute force: every query against every gallery item, `chunk` items at a time (each
    chunk read once for all queries). Ties keep the lower item index first."""
    Q, n = queries_QLD.shape[0], len(store)
    k = min(k, n)
    best_s = torch.full((Q, k), -torch.inf)
    best_i = torch.full((Q, k), n, dtype=torch.long)  # (placeholders rank after every row)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        s = _score(similarity, store.meta.modality, queries_QLD, store.elements(rows.numpy()))
        both_s, both_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, rows.expand(Q, -1)], 1)
        best_s, best_i = top_rows(both_s, both_i, k)
    return Hits(best_s, best_i, [n] * Q)


def two_stage_top_k(
    store: SetIndexStore, similarity: Any, queries_QLD: Tensor, k: int, candidates: int
) -> Hits:
    """Per query element the `candidates` nearest gallery elements by inner product (the ANN
    index), then the union of their items re-scored exactly with `similarity`."""
    if k < 1 or candidates < 1:
        raise UserError(f"k and candidates must be >= 1, got {k}, {candidates}")
    k = min(k, len(store))
    cands = store.candidates(queries_QLD, candidates)
    scores = torch.full((len(cands), k), -torch.inf)
    items = torch.full((len(cands), k), -1, dtype=torch.long)
    for q, rows in enumerate(cands):
        s = _score(similarity, store.meta.modality, queries_QLD[q : q + 1], store.elements(rows))
        top_s, top_i = top_rows(s, torch.from_numpy(rows)[None], k)
        scores[q, : top_s.shape[1]], items[q, : top_s.shape[1]] = top_s[0], top_i[0]
    return Hits(scores, items, [len(c) for c in cands])


@dataclass(frozen=True)
class AutoBudget:
    """How the adaptive search grows its candidates (see `adaptive_top_k`); measured in
    BENCHMARKS.md ("Search on trained models")."""

    first_per_k: int = 8
    """Summary candidates in the first round, per result asked for (at least 32)."""
    seeds_per_element: int = 16
    """Also in the first round: the items of each query element's nearest gallery elements
    (the element index), for galleries whose sets share no component ..."""
    seed_fraction: float = 0.001
    """... fewer on small galleries: at most this share of the gallery per query element."""
    growth: float = 1.5
    """Candidates grow by this factor per round."""
    slack: float = 0.5
    """Multiplier of the expected largest residual of the unscored items above the fitted
    line (`_summary_bound`): larger is safer and slower."""
    max_fraction: float = 0.25
    """Stop growing once this share of the gallery is scored (the bound not yet met) ..."""
    max_scored: int = 20_000
    """... or this many sets: the most work one query can cost."""
    lookahead: int = 3
    """Rounds of summary candidates fetched in one FAISS search."""


def _summary_bound(x: np.ndarray, y: np.ndarray, sigma: float, unseen: int, slack: float) -> float:
    """Estimated largest exact score among `unseen` items whose summary scores are at most
    `sigma`: a line fitted to (summary x, exact y) of the items scored so far at sigma, plus
    `slack` times the expected largest of `unseen` residuals: their spread (RMS) times
    sqrt(2 ln unseen), the Gaussian extreme, or the largest residual seen if that is more."""
    beta, c = 1.0, 0.0
    if len(x) >= 3 and np.ptp(x) > 1e-9:
        beta, c = np.polyfit(x, y, 1)
        beta = max(beta, 0.0)
    residual = y - (beta * x + c) if len(x) else np.zeros(1)
    spread = float(np.sqrt(np.mean(residual**2)))
    extreme = spread * math.sqrt(2 * math.log(max(unseen, 2)))
    return beta * sigma + c + slack * max(extreme, float(residual.max()), 0.0)


class _Ranked:
    """Per query, the gallery items by summary score, fetched `lookahead` rounds ahead."""

    def __init__(self, store: SetIndexStore, summaries_QS: Tensor) -> None:
        self.store, self.summaries = store, summaries_QS
        Q = summaries_QS.shape[0]
        self.scores: list[np.ndarray] = [np.zeros(0, np.float32)] * Q
        self.items: list[np.ndarray] = [np.zeros(0, np.int64)] * Q

    def ensure(self, queries: list[int], depth: int) -> None:
        """Fetch at least `depth` ranked items (or all there are) for each of `queries`."""
        depth = min(depth, len(self.store))
        short = [q for q in queries if len(self.items[q]) < depth]
        if short:
            s, i = self.store.summary_search(self.summaries[short], depth)
            for a, q in enumerate(short):
                keep = i[a].numpy() >= 0
                self.scores[q], self.items[q] = s[a].numpy()[keep], i[a].numpy()[keep]


def adaptive_top_k(
    store: SetIndexStore,
    similarity: Any,
    queries_QLD: Tensor,
    k: int,
    alpha: float,
    budget: AutoBudget = AutoBudget(),
) -> Hits:
    """Top-k with a per-query candidate budget, from the index of set summaries (whose inner
    product is a second-order expansion of smooth-Chamfer, `summary.set_summaries`).

    The first round scores a query's `n` best items by summary score and the items of its
    elements' nearest gallery elements (`budget.seeds_per_element`, fewer on small
    galleries). Each round scores the new items exactly and stops when the k-th best exact
    score reaches an estimated bound on every unscored item: none has a summary score above
    sigma (the (n+1)-th), and a line fitted to (summary, exact) of the scored items, plus
    `budget.slack` times the largest residual expected among the unscored ones, turns sigma
    into a score (`_summary_bound`). Otherwise `n` grows by `budget.growth`, until
    `budget.max_fraction` of the gallery or `budget.max_scored` sets are scored. The bound is
    empirical, not a proof: `setdiv index eval` measures what it costs against exact search."""
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    n_items, Q = len(store), queries_QLD.shape[0]
    k = min(k, n_items)
    summaries = query_summaries(queries_QLD, store.projection, alpha)
    n = max(budget.first_per_k * k, 32)
    cap = max(min(int(budget.max_fraction * n_items), budget.max_scored), n)
    ranked = _Ranked(store, summaries)
    per_element = min(budget.seeds_per_element, int(budget.seed_fraction * n_items))
    seeds = [np.zeros(0, np.int64)] * Q
    if per_element > 0:
        seeds = store.candidates(queries_QLD, per_element)
    seen: list[dict[int, tuple[float, float]]] = [{} for _ in range(Q)]  # (exact, summary)
    rounds = [0] * Q
    active = list(range(Q))
    while active:
        ranked.ensure(active, int(math.ceil(n * budget.growth ** (budget.lookahead - 1))) + 1)
        still = []
        for q in active:
            rounds[q] += 1
            new = [i for i in ranked.items[q][:n].tolist() if i not in seen[q]]
            if rounds[q] == 1:
                new = list(dict.fromkeys([*new, *(i for i in seeds[q].tolist())]))
            if new:
                gallery = store.elements(np.array(new))
                s = _score(similarity, store.meta.modality, queries_QLD[q : q + 1], gallery)[0]
                x = set_summaries(gallery, store.projection) @ summaries[q]
                seen[q].update(zip(new, zip(s.tolist(), x.tolist(), strict=True), strict=True))
            if len(seen[q]) >= min(n_items, cap) or len(ranked.items[q]) <= n:
                continue
            exact, x = np.array(list(seen[q].values())).T
            kth = np.sort(exact)[-k] if len(exact) >= k else -math.inf
            fin = np.isfinite(exact)
            sigma, unseen = float(ranked.scores[q][n]), n_items - len(exact)
            if kth < _summary_bound(x[fin], exact[fin], sigma, unseen, budget.slack):
                still.append(q)
        active, n = still, int(math.ceil(n * budget.growth))
    scores = torch.full((Q, k), -torch.inf)
    items = torch.full((Q, k), -1, dtype=torch.long)
    for q in range(Q):
        rows = torch.tensor(list(seen[q]), dtype=torch.long)
        s = torch.tensor([v[0] for v in seen[q].values()], dtype=torch.float32)
        top_s, top_i = top_rows(s[None], rows[None], k)
        scores[q, : top_s.shape[1]], items[q, : top_s.shape[1]] = top_s[0], top_i[0]
    return Hits(scores, items, [len(x) for x in seen], rounds)


class SetSearcher:
    """An index with the export that made it: encodes queries, searches in two stages.

    Refuses an export whose weights are not the ones the index was built with."""

    def __init__(self, index: str | Path, export: str | Path | None = None) -> None:
        self.store = SetIndexStore.open(index)
        self._load_model(self.store.meta, index, export)

    def _load_model(self, meta: IndexMeta, index: str | Path, export: str | Path | None) -> None:
        """The export the index was built with (or `export`, if it holds the same weights),
        its model and similarity."""
        path = Path(export) if export is not None else Path(meta.export_path)
        self.exported: ExportedModel = load_exported(path)
        if self.exported.sha256 != meta.export_sha256:
            raise UserError(
                f"{index} was built with the export {meta.export_path} (sha256 "
                f"{meta.export_sha256[:12]}...); {path} holds other weights (sha256 "
                f"{self.exported.sha256[:12]}...): rebuild the index with this export"
            )
        self.model = SetModel(self.exported, torch.device("cpu"))
        cfg = self.exported.cfg
        self.similarity = build_similarity(cfg.similarity)
        self.brute_similarity = build_similarity(replace(cfg.similarity, block_size=4096))
        self.alpha = float(cfg.similarity.alpha)

    @property
    def modality(self) -> str:
        return self.store.meta.modality

    def encode_texts(self, texts: list[str]) -> Tensor:
        """(Q, L, D) caption sets of `texts` (queries against an image gallery), through the
        export's `setdiv.load` model."""
        if not texts or any(not t.strip() for t in texts):
            raise UserError("an empty text query")
        return self.model.encode_texts(texts)

    def encode_images(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """(Q, K, D) image sets of model-ready inputs: (Q, 3, S, S) normalised pixels, or
        (Q, R, C) region features with their (Q, R) mask."""
        rows = list(images) if mask is None else [x[m] for x, m in zip(images, mask, strict=True)]
        return self.model.encode_images(rows)

    def search(self, queries: Tensor, k: int = 10, candidates: int | str = AUTO) -> Hits:
        """Two-stage top-k of (Q, L, D) query sets: `adaptive_top_k` for "auto", else
        `two_stage_top_k` with `candidates` elements per query element."""
        if candidates == AUTO:
            return adaptive_top_k(self.store, self.similarity, queries, k, self.alpha)
        if not isinstance(candidates, int) or isinstance(candidates, bool):
            raise UserError(f"candidates must be 'auto' or an integer, got {candidates!r}")
        return two_stage_top_k(self.store, self.similarity, queries, k, candidates)

    def exact(self, queries: Tensor, k: int = 10) -> Hits:
        """Brute-force top-k over the whole gallery (the reference two-stage search is
        measured against)."""
        return exact_top_k(self.store, self.brute_similarity, queries, k)

    def describe(self, hits: Hits, q: int) -> list[dict[str, Any]]:
        """Query `q`'s hits as records: rank, score, item index, id, text."""
        out = []
        for rank, (s, i) in enumerate(
            zip(hits.scores[q].tolist(), hits.items[q].tolist(), strict=True)
        ):
            if i < 0 or not math.isfinite(s):  # a broken set never makes a hit
                break
            item = self.store.items[i]
            out.append({"rank": rank + 1, "score": s, "index": i, **item})
        return out
