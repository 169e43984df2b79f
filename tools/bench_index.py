"""Indexed search (`setdiv.index`) on synthetic galleries of embedding sets: build time,
index memory, single-query latency (p50 / p99), queries/s at batch 64, and recall@10 against
the exact brute-force smooth-Chamfer ranking, which is also timed as the baseline.
`--candidates auto` (the default, as in `setdiv search`) is the adaptive search over set
summaries; `--candidates N` the element two-stage search with N ANN hits per query element.

Gallery: N items of K = 4 random unit vectors of width D. Queries: Q random sets of L = 4; for
each, PLANTED gallery items are noisy copies of it (graded noise), so the exact top-10 is a
definite set and recall is meaningful. Elements are stored fp16 (what the rerank reads).

    python tools/bench_index.py --n 100000 --dim 256 --index flat ivf [--out results.json]
    python tools/bench_index.py --n 1000000 --dim 1024 --index sq8 ivf-sq8 --nlist 4096
    python tools/bench_index.py --n 100000 --dim 256 --index ivf --candidates auto 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from setdiv.config import SimilarityConfig
from setdiv.index.query import candidates_arg
from setdiv.index.search import AUTO, adaptive_top_k, exact_top_k, two_stage_top_k
from setdiv.index.store import AnnSpec, IndexMeta, SetIndexStore
from setdiv.similarity import build_similarity

INDEXES = {
    "flat": lambda a: AnnSpec("flat"),
    "sq8": lambda a: AnnSpec("flat", codec="sq8"),
    "ivf": lambda a: AnnSpec("ivf", nlist=a.nlist, nprobe=a.nprobe[0]),
    "ivf-sq8": lambda a: AnnSpec("ivf", nlist=a.nlist, nprobe=a.nprobe[0], codec="sq8"),
    "hnsw": lambda a: AnnSpec("hnsw", m=a.m, ef_search=a.ef_search),
}
K = L = 4
PLANTED = 10
NOISE = np.linspace(0.3, 1.2, PLANTED)
"""Noise (relative to a unit element, per element) of the planted copies, best first."""


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def queries_and_plants(
    n: int, q: int, dim: int, seed: int
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(Q, L, D) queries, and {gallery row: (K, D) planted copy of a query}."""
    g = torch.Generator().manual_seed(seed)
    queries = unit(torch.randn(q, L, dim, generator=g))
    rows = torch.randperm(n, generator=g)[: q * PLANTED].view(q, PLANTED)
    plants = {}
    for i in range(q):
        for j in range(PLANTED):
            perm = torch.randperm(L, generator=g)[:K]  # K == L: a shuffled copy
            noise = torch.randn(K, dim, generator=g) * NOISE[j] / dim**0.5
            plants[int(rows[i, j])] = unit(queries[i, perm] + noise)
    return queries, plants


def build(
    root: Path, spec: AnnSpec, n: int, dim: int, plants: dict, seed: int, chunk: int
) -> tuple:
    """The index, its build seconds (generation excluded), and its bytes on disk (the element
    and summary FAISS files; the element matrix). Items are
    appended `chunk` at a time, each append a part (and a rewrite of the ANN file)."""
    meta = IndexMeta("image", "synthetic", "0" * 64, "", spec, K, dim, "float16")
    store = SetIndexStore.create(root, meta)
    g = torch.Generator().manual_seed(seed + 1)
    seconds = 0.0
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        sets = unit(torch.randn(m, K, dim, generator=g))
        for row, planted in plants.items():
            if start <= row < start + m:
                sets[row - start] = planted
        items = [{"id": start + i} for i in range(m)]
        t0 = time.perf_counter()
        store.append(sets, items, f"synthetic[{start}:{start + m}]")
        seconds += time.perf_counter() - t0
        print(f"  added {start + m}/{n} ({seconds:.0f} s)", flush=True)
    ann_bytes = sum(p.stat().st_size for p in root.glob("ann-*.faiss"))
    ann_bytes += sum(p.stat().st_size for p in root.glob("summary-*.faiss"))
    element_bytes = sum(p.stat().st_size for p in root.glob("elements-*.npy"))
    return SetIndexStore.open(root), seconds, ann_bytes, element_bytes


def latencies(fn: object, queries: torch.Tensor) -> np.ndarray:
    out = []
    for i in range(queries.shape[0]):
        t0 = time.perf_counter()
        fn(queries[i : i + 1])  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return np.array(out) * 1000


def run_one(args: argparse.Namespace, name: str, workdir: Path) -> list[dict]:
    """Build one index, then measure it (for ivf: once per --nprobe value)."""
    torch.manual_seed(0)
    queries, plants = queries_and_plants(args.n, args.queries, args.dim, args.seed)
    root = workdir / f"{name}-{args.n}-{args.dim}"
    shutil.rmtree(root, ignore_errors=True)
    print(f"{name}: N={args.n} D={args.dim}: building", flush=True)
    store, build_s, ann_bytes, element_bytes = build(
        root, INDEXES[name](args), args.n, args.dim, plants, args.seed, args.chunk
    )
    sim = build_similarity(SimilarityConfig(alpha=args.alpha, block_size=4096))
    exact_top_k(store, sim, queries[:1], 10)  # warm up: page the element file in
    t0 = time.perf_counter()
    exact = exact_top_k(store, sim, queries, 10)
    exact_all_s = time.perf_counter() - t0
    owner = {row: i // PLANTED for i, row in enumerate(plants)}  # inserted query-major
    planted = float(np.mean([
        sum(owner.get(r) == i for r in top) / 10 for i, top in enumerate(exact.items.tolist())
    ]))  # fmt: skip
    n_exact = min(args.exact_queries, queries.shape[0])
    exact_single = latencies(lambda q: exact_top_k(store, sim, q, 10), queries[:n_exact])
    common = {
        "index": name,
        "factory": store.meta.ann.factory(),
        "n": args.n,
        "dim": args.dim,
        "elements": args.n * K,
        "build_s": build_s,
        "parts": -(-args.n // args.chunk),
        "ann_mib": ann_bytes / 2**20,
        "element_matrix_mib": element_bytes / 2**20,
        "exact_top10_planted": planted,
        "exact_p50_ms": float(np.percentile(exact_single, 50)),
        "exact_all_queries_s": exact_all_s,
    }
    results = []
    for nprobe in args.nprobe if store.meta.ann.kind == "ivf" else [None]:
        if nprobe is not None:
            for ann in (store.ann, store.summary):
                faiss.extract_index_ivf(ann).nprobe = nprobe
        for candidates in args.candidates:
            row = measure(store, sim, queries, exact, candidates, args.alpha)
            results.append({**common, "nprobe": nprobe, "candidates": candidates, **row})
            results[-1]["speedup_p50_vs_exact"] = results[-1]["exact_p50_ms"] / row["p50_ms"]
            print(json.dumps(results[-1]), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return results


def measure(
    store: SetIndexStore,
    sim: object,
    queries: torch.Tensor,
    exact: object,
    candidates: int | str,
    alpha: float,
) -> dict:
    """Latency, throughput and recall of the indexed search against the `exact` hits."""
    if candidates == AUTO:
        search = lambda q: adaptive_top_k(store, sim, q, 10, alpha)  # noqa: E731
    else:
        search = lambda q: two_stage_top_k(store, sim, q, 10, candidates)  # noqa: E731
    search(queries[:2])  # warm up
    fast = search(queries)
    pairs = zip(fast.items.tolist(), exact.items.tolist(), strict=True)  # type: ignore[attr-defined]
    single = latencies(search, queries)
    t0 = time.perf_counter()
    for i in range(0, queries.shape[0], 64):
        search(queries[i : i + 64])
    return {
        "p50_ms": float(np.percentile(single, 50)),
        "p99_ms": float(np.percentile(single, 99)),
        "qps_batch64": queries.shape[0] / (time.perf_counter() - t0),
        "recall_at_10_vs_exact": float(np.mean([len(set(a) & set(b)) / 10 for a, b in pairs])),
        "mean_rescored": float(np.mean(fast.candidates)),
        "fraction_scored": float(np.mean(fast.candidates)) / len(store),
        "mean_rounds": float(np.mean(fast.rounds)) if fast.rounds else 1.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="gallery items")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--index", nargs="+", choices=sorted(INDEXES), default=["flat", "ivf"])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--chunk", type=int, default=50_000, help="items per append (index part)")
    p.add_argument("--exact-queries", type=int, default=5, help="single exact queries timed")
    p.add_argument(
        "--candidates",
        type=candidates_arg,
        nargs="+",
        default=[AUTO],
        help="auto (adaptive, over set summaries) or ANN hits per query element; each measured",
    )
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[32], help="ivf: measured each")
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where indexes are built (default: a tmp dir)")
    p.add_argument("--keep", action="store_true", help="keep the built indexes")
    p.add_argument("--out", default=None, help="append the JSON results to this file")
    args = p.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {machine}; torch threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for name in args.index:
            for result in run_one(args, name, Path(tmp)):
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({**result, "machine": machine}) + "\n")


if __name__ == "__main__":
    main()
