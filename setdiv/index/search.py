"""Two-stage search over an index of embedding sets: element-level ANN candidates, then the
exact set similarity of the export (smooth-Chamfer, ...) over the union of their items.

Shape legend: Q queries, L query set size, N gallery items, K gallery set size, D width.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from setdiv.data.shards import sha256_file
from setdiv.errors import UserError
from setdiv.export import ExportedModel, load_exported
from setdiv.index.store import SetIndexStore
from setdiv.similarity import build_similarity

__all__ = ["Hits", "SetSearcher", "exact_top_k", "two_stage_top_k"]


@dataclass
class Hits:
    """Top-k results of Q queries, best first."""

    scores: Tensor
    """(Q, k) set similarities."""
    items: Tensor
    """(Q, k) gallery item indices."""
    candidates: list[int]
    """Per query, how many items were re-scored exactly."""


def _score(similarity: Any, modality: str, queries_QLD: Tensor, gallery_NKD: Tensor) -> Tensor:
    """(Q, N) similarities of query sets to gallery sets; the image side is always the
    similarity's first argument."""
    if modality == "image":  # gallery images, text queries
        return similarity(gallery_NKD, queries_QLD).T
    return similarity(queries_QLD, gallery_NKD)


def exact_top_k(
    store: SetIndexStore, similarity: Any, queries_QLD: Tensor, k: int, chunk: int = 65536
) -> Hits:
    """Brute force: every query against every gallery item, `chunk` items at a time (each
    chunk read once for all queries). Ties keep the lower item index first."""
    Q, n = queries_QLD.shape[0], len(store)
    k = min(k, n)
    best_s = torch.full((Q, k), -torch.inf)
    best_i = torch.zeros((Q, k), dtype=torch.long)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        s = _score(similarity, store.meta.modality, queries_QLD, store.elements(rows.numpy()))
        top = torch.topk(torch.cat([best_s, s], dim=1), k, dim=1, sorted=True)
        best_i = torch.gather(torch.cat([best_i, rows.expand(Q, -1)], dim=1), 1, top.indices)
        best_s = top.values
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
        top = torch.topk(s[0], min(k, len(rows)))
        scores[q, : len(top.values)] = top.values
        items[q, : len(top.values)] = torch.from_numpy(rows)[top.indices]
    return Hits(scores, items, [len(c) for c in cands])


class SetSearcher:
    """An index with the export that made it: encodes queries, searches in two stages.

    Refuses an export whose weights are not the ones the index was built with."""

    def __init__(self, index: str | Path, export: str | Path | None = None) -> None:
        self.store = SetIndexStore.open(index)
        meta = self.store.meta
        path = Path(export) if export is not None else Path(meta.export_path)
        self.exported: ExportedModel = load_exported(path)
        if self.exported.sha256 != meta.export_sha256:
            raise UserError(
                f"{index} was built with the export {meta.export_path} (sha256 "
                f"{meta.export_sha256[:12]}...); {path} holds other weights (sha256 "
                f"{self.exported.sha256[:12]}...): rebuild the index with this export"
            )
        cfg = self.exported.cfg
        self.similarity = build_similarity(cfg.similarity)
        self.brute_similarity = build_similarity(replace(cfg.similarity, block_size=4096))

    @property
    def modality(self) -> str:
        return self.store.meta.modality

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        """(Q, L, D) caption sets of `texts` (queries against an image gallery)."""
        if not texts or any(not t.strip() for t in texts):
            raise UserError("an empty text query")
        tok = self.exported.tokenizer
        ids = [tok.encode(t) for t in texts]
        T = max(map(len, ids))
        tokens = torch.full((len(ids), T), tok.pad_id, dtype=torch.long)
        for i, t in enumerate(ids):
            tokens[i, : len(t)] = torch.tensor(t)
        return self.exported.model.encode_text(tokens, tokens != tok.pad_id).embeds.float()

    @torch.no_grad()
    def encode_images(self, images: Tensor, mask: Tensor | None = None) -> Tensor:
        """(Q, K, D) image sets of model-ready inputs (normalised pixels or region features)."""
        return self.exported.model.encode_image(images, mask).embeds.float()

    def search(self, queries: Tensor, k: int = 10, candidates: int = 64) -> Hits:
        """Two-stage top-k of (Q, L, D) query sets (`two_stage_top_k`)."""
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
            if i < 0:
                break
            item = self.store.items[i]
            out.append({"rank": rank + 1, "score": s, "index": i, **item})
        return out


def export_identity(path: str | Path) -> tuple[str, str, str]:
    """(export directory, sha256 of its weights, its config.yaml text)."""
    from setdiv.export import WEIGHTS, find_export

    root = find_export(path)
    return str(root.resolve()), sha256_file(root / WEIGHTS), (root / "config.yaml").read_text()
