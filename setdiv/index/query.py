"""`setdiv search` and `setdiv index eval`: queries against an index, and what the two-stage
search costs in accuracy against the exact brute-force ranking."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from setdiv.data.loaders import build_eval_reader
from setdiv.data.samples import image_file_pixels, sample_options
from setdiv.errors import UserError, positive_int
from setdiv.index.search import AUTO, Hits, SetSearcher
from setdiv.model.encoders import image_input_kind

__all__ = [
    "add_eval_arguments",
    "add_search_arguments",
    "evaluate_index",
    "run_eval",
    "run_search",
]


CANDIDATES_HELP = (
    "auto (default: adaptive, per query, from the set-summary index) or N (the items of the "
    "N nearest elements of each query element)"
)


def candidates_arg(text: str) -> int | str:
    """`--candidates`: "auto" or an integer >= 1."""
    return AUTO if text == AUTO else positive_int(text)


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index directory (`setdiv index build`)")
    p.add_argument("text", nargs="?", default=None, help="a text query (image galleries)")
    p.add_argument("--image", default=None, help="an image file as the query (text galleries)")
    p.add_argument(
        "--sample",
        nargs=2,
        metavar=("SHARDS", "IMAGE_ID"),
        default=None,
        help="a shard sample's image as the query (any image encoder, regions included)",
    )
    p.add_argument("--k", type=positive_int, default=10, help="results")
    p.add_argument("--candidates", type=candidates_arg, default=AUTO, help=CANDIDATES_HELP)
    p.add_argument("--export", default=None, help="the export (default: the one the index names)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _image_query(searcher: SetSearcher, args: argparse.Namespace) -> torch.Tensor:
    cfg = searcher.exported.cfg
    kind = image_input_kind(cfg.model.image.name)
    if args.sample is not None:
        shards, image_id = args.sample
        reader = build_eval_reader(cfg.data, shards, kind, searcher.exported.tokenizer)
        for batch in reader:
            if image_id in batch.image_ids:
                i = batch.image_ids.index(image_id)
                mask = batch.image_mask[i : i + 1] if batch.image_mask is not None else None
                return searcher.encode_images(batch.images[i : i + 1], mask)
        raise UserError(f"{shards}: no sample with image id {image_id!r}")
    if kind != "image":
        raise UserError(
            f"the export's image encoder ({cfg.model.image.name}) reads region features, not "
            "image files: query with --sample SHARDS IMAGE_ID"
        )
    opts = sample_options(cfg.data, "image", None, train=False, augment=False)  # type: ignore[arg-type]
    pixels = image_file_pixels(args.image, cfg.data.image_size, cfg.data.image_transform, opts)
    return searcher.encode_images(pixels)


def run_search(args: argparse.Namespace) -> int:
    given = [x is not None for x in (args.text, args.image, args.sample)]
    if sum(given) != 1:
        raise UserError("give exactly one query: TEXT, --image PATH or --sample SHARDS IMAGE_ID")
    searcher = SetSearcher(args.index, args.export)
    wants = "image" if args.text is not None else "text"
    if searcher.modality != wants:
        raise UserError(
            f"{args.index} holds {searcher.modality} items: query it with "
            + ("text" if searcher.modality == "image" else "--image or --sample")
        )
    query = (
        searcher.encode_texts([args.text])
        if args.text is not None
        else _image_query(searcher, args)
    )
    hits = searcher.search(query, args.k, args.candidates)
    records = searcher.describe(hits, 0)
    if args.json:
        print(json.dumps({"query": args.text or args.image or args.sample, "hits": records}))
        return 0
    for r in records:
        text = r.get("text") or " | ".join(r.get("captions", []))[:120]
        print(f"{r['rank']:>3}  {r['score']:8.4f}  {r['id']!s:<16} {text}")
    n = len(searcher.store)
    print(f"({hits.candidates[0]} of {n} items ({hits.candidates[0] / n:.1%}) scored exactly)")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index directory")
    p.add_argument("--queries", required=True, help="shards whose other modality are queries")
    p.add_argument(
        "--k", type=positive_int, default=10, help="depth of the overlap with exact search"
    )
    p.add_argument("--candidates", type=candidates_arg, default=AUTO, help=CANDIDATES_HELP)
    p.add_argument("--export", default=None, help="the export (default: the one the index names)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _recalls(hits: Hits, relevant: list[set[int]]) -> dict[str, float]:
    out = {}
    for k in (1, 5, 10):
        top = hits.items[:, :k].tolist()
        out[f"r{k}"] = 100.0 * float(
            np.mean([bool(set(t) & r) for t, r in zip(top, relevant, strict=True)])
        )
    out["rsum"] = out["r1"] + out["r5"] + out["r10"]
    return out


def evaluate_index(
    searcher: SetSearcher, queries: str, k: int = 10, candidates: int | str = AUTO
) -> dict[str, Any]:
    """Indexed (`candidates`: auto or N per element) against exact search on the other
    modality of `queries`: the retrieval recalls of both (a query's relevant items share its
    image), recall@k of the indexed search against the exact top-k, and the share of the
    gallery it scored."""
    ex = searcher.exported
    kind = image_input_kind(ex.cfg.model.image.name)
    reader = build_eval_reader(ex.cfg.data, queries, kind, ex.tokenizer)
    q_modality = "text" if searcher.modality == "image" else "image"
    enc = searcher.model.encode_batches(reader, modality=q_modality, progress=True)
    items = searcher.store.items
    if searcher.modality == "image":
        owners = np.repeat(np.arange(len(enc.caption_counts)), enc.caption_counts)
        qs, owner = enc.captions, [enc.image_ids[n] for n in owners.tolist()]
        by_id: dict[Any, set[int]] = {}
        for n, it in enumerate(items):
            by_id.setdefault(it["id"], set()).add(n)
    else:
        qs, owner = enc.images, list(enc.image_ids)
        by_id = {}
        for n, it in enumerate(items):
            by_id.setdefault(it["image_id"], set()).add(n)
    relevant = [by_id.get(o, set()) for o in owner]
    depth = max(k, 10)
    exact = searcher.exact(qs, depth)
    fast = searcher.search(qs, depth, candidates)
    overlap = [
        len(set(a[:k]) & set(b[:k])) / min(k, len(items))
        for a, b in zip(fast.items.tolist(), exact.items.tolist(), strict=True)
    ]
    scored = np.array(fast.candidates) / len(items)
    return {
        "queries": len(owner),
        "gallery": len(items),
        "candidates": candidates,
        "mean_rescored": float(np.mean(fast.candidates)),
        "fraction_scored": float(scored.mean()),
        "fraction_scored_p99": float(np.percentile(scored, 99)),
        f"recall@{k}_vs_exact": float(np.mean(overlap)),
        "exact": _recalls(exact, relevant),
        "indexed": _recalls(fast, relevant),
    }


def run_eval(args: argparse.Namespace) -> int:
    result = evaluate_index(
        SetSearcher(args.index, args.export), args.queries, args.k, args.candidates
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['queries']} queries, {result['gallery']} items, candidates "
        f"{result['candidates']}: {result['mean_rescored']:.0f} scored exactly per query on "
        f"average ({result['fraction_scored']:.1%} of the gallery, p99 "
        f"{result['fraction_scored_p99']:.1%})"
    )
    print(f"{'search':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'sum':>9}")
    for name in ("exact", "indexed"):
        m = result[name]
        print(f"{name:<12}{m['r1']:8.1f}{m['r5']:8.1f}{m['r10']:8.1f}{m['rsum']:9.1f}")
    print(f"recall@{args.k} of indexed vs exact: {result[f'recall@{args.k}_vs_exact']:.4f}")
    return 0
