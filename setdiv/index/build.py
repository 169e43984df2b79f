"""`setdiv index build`: encode a gallery once (the evaluator's reader and encode path, on 1 or
N local processes) and add its element sets to an index, new or existing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from setdiv.data.reader import ShardSet, build_eval_reader
from setdiv.distributed import (
    all_gather_list,
    all_gather_rows,
    is_rank_zero,
    limit_cpu_threads,
    log_as_rank,
    pick_device,
    process_group,
    rank_and_world,
    spawn_local,
)
from setdiv.errors import UserError
from setdiv.eval.evaluator import encode
from setdiv.export import ExportedModel, load_exported
from setdiv.index.search import export_identity
from setdiv.index.store import AnnSpec, IndexMeta, SetIndexStore
from setdiv.model.encoders import IMAGE_INPUT_KIND

__all__ = ["add_build_arguments", "encode_gallery", "gallery_items", "run_build"]

log = logging.getLogger(__name__)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", help="export directory (or its model.safetensors, or a run dir)")
    p.add_argument("--data", required=True, help="gallery shards (brace pattern or glob)")
    p.add_argument("--modality", choices=("image", "text"), required=True, help="gallery items")
    p.add_argument("--out", required=True, help="index directory (appended to if it exists)")
    p.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat", help="ANN index")
    p.add_argument("--codec", default="flat", help="ANN element code: flat|fp16|sq8|pq<M>")
    p.add_argument("--nlist", type=int, default=1024, help="ivf: inverted lists")
    p.add_argument("--nprobe", type=int, default=32, help="ivf: lists searched per element")
    p.add_argument("--m", type=int, default=32, help="hnsw: neighbours per node")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw: search list size")
    p.add_argument("--fp16", action="store_true", help="store the element matrix in fp16")
    p.add_argument("--nproc", type=int, default=1, help="local processes encoding the gallery")


def gallery_items(modality: str, image_ids: list, caption_ids: list, texts: list[str]) -> list:
    """One record per gallery item: an image with its captions, or a caption with its image."""
    if modality == "image":
        return [{"id": i, "captions": texts[5 * n : 5 * n + 5]} for n, i in enumerate(image_ids)]
    return [
        {"id": c, "image_id": image_ids[m // 5], "text": texts[m]}
        for m, c in enumerate(caption_ids)
    ]


def encode_gallery(
    exported: ExportedModel, data: str, modality: str, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]] | None:
    """(n, K, D) element sets and item records of `data`'s images or captions, encoded with
    this rank's share of the process group; rank 0 gets them all, other ranks None."""
    rank, world = rank_and_world()
    kind = IMAGE_INPUT_KIND[exported.cfg.model.image.name]
    reader = build_eval_reader(exported.cfg.data, data, kind, exported.tokenizer, rank, world)
    enc = encode(
        exported.model.to(device), reader, device, progress=is_rank_zero(rank), modality=modality
    )
    sets = all_gather_rows(enc.images if modality == "image" else enc.captions)
    image_ids = all_gather_list(enc.image_ids)
    caption_ids, texts = all_gather_list(enc.caption_ids), all_gather_list(enc.captions_text)
    if not is_rank_zero(rank):
        return None
    if enc.skipped or len(image_ids) < reader.shards.num_samples:
        log.warning(
            "%s: %d of %d images could not be read and are not in the index",
            data,
            reader.shards.num_samples - len(image_ids),
            reader.shards.num_samples,
        )
    return sets.cpu(), gallery_items(modality, image_ids, caption_ids, texts)


def _check_existing(out: Path, sha: str, modality: str) -> None:
    """An existing index at `out` must come from the same export and hold `modality` items."""
    if not (out / "meta.json").exists():
        return
    meta = SetIndexStore.open(out).meta
    if meta.export_sha256 != sha:
        raise UserError(
            f"{out} was built with another export ({meta.export_path}): append with the same "
            "export, or build a new index"
        )
    if meta.modality != modality:
        raise UserError(f"{out} holds {meta.modality} items, not {modality}")


def _open_or_create(args: argparse.Namespace, K: int, D: int) -> SetIndexStore:
    out = Path(args.out)
    if (out / "meta.json").exists():
        return SetIndexStore.open(out)
    path, sha, config_text = export_identity(args.export)
    spec = AnnSpec(args.kind, args.nlist, args.m, args.codec, args.nprobe, args.ef_search)
    dtype = "float16" if args.fp16 else "float32"
    return SetIndexStore.create(
        out, IndexMeta(args.modality, path, sha, config_text, spec, K, D, dtype)
    )


def _worker(args: argparse.Namespace) -> None:
    with process_group() as job:
        log_as_rank(job)
        exported = load_exported(args.export)
        device = pick_device(job)
        limit_cpu_threads(device, 0)
        gallery = encode_gallery(exported, args.data, args.modality, device)
        if gallery is None:
            return
        sets, items = gallery
        store = _open_or_create(args, sets.shape[1], sets.shape[2])
        store.append(sets, items, args.data)
        print(
            f"index {args.out}: +{len(items)} {args.modality} items ({len(store)} in all, "
            f"{store.ann.ntotal} elements, {store.meta.ann.factory()})"
        )


def run_build(args: argparse.Namespace) -> int:
    """Check the export, shards and index spec before any encoding, then build."""
    if args.nproc < 1:
        raise UserError("--nproc must be >= 1")
    AnnSpec(args.kind, args.nlist, args.m, args.codec, args.nprobe, args.ef_search)
    _check_existing(Path(args.out), export_identity(args.export)[1], args.modality)
    ShardSet.resolve(args.data).verify()
    if args.nproc == 1:
        _worker(args)
    else:
        spawn_local(_worker, args.nproc, args)
    return 0
