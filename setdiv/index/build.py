"""`setdiv index build`: encode a gallery once (the evaluator's reader and encode path, on 1 or
N local processes) and add its element sets to an index, new or existing."""

from __future__ import annotations

import argparse
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from setdiv import config as config_lib
from setdiv.api import SetModel
from setdiv.data import remote
from setdiv.data.loaders import build_eval_reader, resolve_shards
from setdiv.data.shards import ShardSet
from setdiv.distributed import (
    all_gather_list,
    all_gather_rows,
    is_rank_zero,
    limit_cpu_threads,
    log_as_rank,
    pick_device,
    process_group,
    rank_and_world,
    run_ranks,
)
from setdiv.distributed.jobs import add_nproc_argument
from setdiv.errors import UserError, positive_int
from setdiv.export import ExportedModel, export_identity, find_export, load_exported
from setdiv.index.ray_build import add_ray_arguments, encode_gallery_ray
from setdiv.index.store import AnnSpec, IndexMeta, SetIndexStore
from setdiv.model.encoders import image_input_kind
from setdiv.paths import ExportFiles

__all__ = ["add_build_arguments", "encode_gallery", "gallery_items", "run_build"]

log = logging.getLogger(__name__)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", help="export directory (or its model.safetensors, or a run dir)")
    p.add_argument("--data", required=True, help="gallery shards (brace pattern or glob)")
    p.add_argument("--modality", choices=("image", "text"), required=True, help="gallery items")
    p.add_argument("--out", required=True, help="index directory (appended to if it exists)")
    # Index options default to None: an append may repeat them, never change them.
    p.add_argument("--kind", choices=("flat", "ivf", "hnsw"), help="ANN index (default flat)")
    p.add_argument("--codec", help="ANN element code: flat|fp16|sq8|pq<M> (default flat)")
    p.add_argument("--nlist", type=int, help="ivf: inverted lists (default 1024)")
    p.add_argument("--nprobe", type=int, help="ivf: lists searched per element (default 32)")
    p.add_argument("--m", type=int, help="hnsw: neighbours per node (default 32)")
    p.add_argument("--ef-search", type=int, help="hnsw: search list size (default 128)")
    p.add_argument(
        "--fp16", action="store_true", default=None, help="store the element matrix in fp16"
    )
    p.add_argument(
        "--batch-size", type=positive_int, help="images per encoding batch (data.eval_batch_size)"
    )
    add_nproc_argument(p, "local processes encoding the gallery")
    add_ray_arguments(p)


SPEC_OPTIONS = ("kind", "nlist", "m", "codec", "nprobe", "ef_search")
PICTURES = (".jpg", ".jpeg", ".png", ".webp")


def _spec(args: argparse.Namespace) -> AnnSpec:
    given = {k: getattr(args, k) for k in SPEC_OPTIONS if getattr(args, k) is not None}
    return AnnSpec(**given)


def picture_members(shards: ShardSet) -> dict[str, dict[str, str]]:
    """{sample key: {"shard": path, "member": name}} of every picture in `shards` (tar
    headers only), so a server can show an image item."""
    out = {}
    for path in shards.paths:
        if remote.is_remote(path):  # (the service shows pictures from local shards only)
            log.info("%s: remote shard, its pictures are not listed for the service", path)
            continue
        try:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    key, dot, ext = m.name.rpartition(".")
                    if m.isfile() and dot and f".{ext.lower()}" in PICTURES:
                        out[key] = {"shard": str(Path(path).resolve()), "member": m.name}
        except (OSError, tarfile.TarError) as exc:
            log.warning("%s: pictures not listed (%s)", path, exc)
    return out


def gallery_items(
    modality: str,
    image_ids: list,
    caption_ids: list,
    texts: list[str],
    counts: list[int],
    pictures: dict[str, dict[str, str]] | None = None,
) -> list:
    """One record per gallery item: an image with its captions (and where its picture is, if
    the shards hold one), or a caption with its image. `counts` (N,): each image's captions
    (image-major; 5 for COCO, 1 for web pairs)."""
    ends = np.cumsum(counts).tolist()
    if modality == "image":
        pictures = pictures or {}
        return [
            {"id": i, "captions": texts[end - c : end]}
            | ({"picture": pictures[str(i)]} if str(i) in pictures else {})
            for i, c, end in zip(image_ids, counts, ends, strict=True)
        ]
    owners = np.repeat(np.arange(len(counts)), counts).tolist()
    return [
        {"id": c, "image_id": image_ids[owners[m]], "text": texts[m]}
        for m, c in enumerate(caption_ids)
    ]


def encode_gallery(
    exported: ExportedModel, data: str, modality: str, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]] | None:
    """(n, K, D) element sets and item records of `data`'s images or captions, encoded with
    this rank's share of the process group; rank 0 gets them all, other ranks None."""
    rank, world = rank_and_world()
    kind = image_input_kind(exported.cfg.model.image.name)
    reader = build_eval_reader(exported.cfg.data, data, kind, exported.tokenizer, rank, world)
    model = SetModel(exported, device)
    enc = model.encode_batches(reader, modality=modality, progress=is_rank_zero(rank))
    sets = all_gather_rows(enc.images if modality == "image" else enc.captions)
    image_ids = all_gather_list(enc.image_ids)
    caption_ids, texts = all_gather_list(enc.caption_ids), all_gather_list(enc.captions_text)
    counts = all_gather_list(enc.caption_counts)
    if not is_rank_zero(rank):
        return None
    _warn_unread(data, len(image_ids), reader.shards.num_samples)
    pictures = picture_members(reader.shards) if modality == "image" else None
    return sets.cpu(), gallery_items(modality, image_ids, caption_ids, texts, counts, pictures)


def _warn_unread(data: str, read: int, listed: int) -> None:
    if read < listed:
        log.warning("%s: %d of %d images could not be read and are not in the index",
                    data, listed - read, listed)  # fmt: skip


def _check_existing(args: argparse.Namespace, sha: str) -> None:
    """An existing index at `args.out` must come from the same export, hold `modality` items,
    have the options given, and not hold these shards already."""
    out, modality = Path(args.out), args.modality
    if not (out / "meta.json").exists():
        return
    store = SetIndexStore.open(out)
    meta = store.meta
    if meta.export_sha256 != sha:
        raise UserError(
            f"{out} was built with another export ({meta.export_path}): append with the same "
            "export, or build a new index"
        )
    if meta.modality != modality:
        raise UserError(f"{out} holds {meta.modality} items, not {modality}")
    differ = [
        f"--{k.replace('_', '-')} {getattr(args, k)} (the index has {getattr(meta.ann, k)})"
        for k in SPEC_OPTIONS
        if getattr(args, k) is not None and getattr(args, k) != getattr(meta.ann, k)
    ]
    if args.fp16 and meta.dtype != "float16":
        differ.append("--fp16 (the index stores float32)")
    if differ:
        raise UserError(f"{out}: an append cannot change the index's options: {', '.join(differ)}")
    store.check_new_shards(args.shard_sha256, args.data)


def _open_or_create(args: argparse.Namespace, K: int, D: int) -> SetIndexStore:
    out = Path(args.out)
    if (out / "meta.json").exists():
        return SetIndexStore.open(out)
    path, sha, config_text = export_identity(args.export)
    spec = _spec(args)
    dtype = "float16" if args.fp16 else "float32"
    return SetIndexStore.create(
        out, IndexMeta(args.modality, path, sha, config_text, spec, K, D, dtype)
    )


def _worker(args: argparse.Namespace) -> None:
    with process_group() as job:
        log_as_rank(job)
        exported = load_exported(args.export)
        if args.batch_size:
            exported.cfg.data.eval_batch_size = args.batch_size
        device = pick_device(job)
        limit_cpu_threads(device, 0)
        gallery = encode_gallery(exported, args.data, args.modality, device)
        if gallery is None:
            return
        _append(args, *gallery)


def _append(args: argparse.Namespace, sets: torch.Tensor, items: list[dict[str, Any]]) -> None:
    store = _open_or_create(args, sets.shape[1], sets.shape[2])
    store.append(sets, items, args.data, args.shard_sha256)
    print(
        f"index {args.out}: +{len(items)} {args.modality} items ({len(store)} in all, "
        f"{store.ann.ntotal} elements, {store.meta.ann.factory()})"
    )


def _build_on_ray(args: argparse.Namespace, shards: ShardSet) -> None:
    sets, got, nodes = encode_gallery_ray(args)
    _warn_unread(args.data, len(got["image_ids"]), shards.num_samples)
    pictures = picture_members(shards) if args.modality == "image" else None
    items = gallery_items(args.modality, got["image_ids"], got["caption_ids"], got["texts"],
                          got["counts"], pictures)  # fmt: skip
    log.info("encoded on %d Ray node(s)", nodes)
    _append(args, sets, items)


def run_build(args: argparse.Namespace) -> int:
    """Check the export, shards and index spec before any encoding, then build."""
    cfg = config_lib.load([ExportFiles(find_export(args.export)).config])
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not an index directory")
    if not (out / "meta.json").exists():  # (an append keeps the index's options)
        _spec(args).check_width(cfg.model.embed_dim)
    shards = resolve_shards(cfg.data, args.data)
    shards.verify()
    args.shard_sha256 = shards.sha256s()  # (img2dataset shards: hashed here, once)
    _check_existing(args, export_identity(args.export)[1])
    if args.ray:
        if args.nproc != 1:
            raise UserError("--ray encodes with Ray actors: leave --nproc out")
        _build_on_ray(args, shards)
    else:
        run_ranks(_worker, args.nproc, args)
    return 0
