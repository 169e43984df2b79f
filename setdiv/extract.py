"""`setdiv extract`: run a frozen image tower once over shards and cache its token features.

    setdiv extract CONFIG --data SHARDS --out DIR [--nproc N] [key=value ...]

Every input shard becomes one entry `DIR/features-<its stem>.<digest of its path>.tar` (see
`setdiv.data.features`): one sample per readable image, under the image's own key, holding
the tower's token grid as fp16 `.npy` (R, C) and the captions as `.json`. `DIR/cache.json`
records the tower, the sha256 of its weights and the transform: extracting into a cache made
with others is refused unless `--overwrite` (which deletes its entries first).
Training then reads the cache in place of the images with `data.features=DIR` (the tower is
not run; the set heads and projections train at feature-reading speed). The images go through
the test transform, so train the cached model against `data.train_transform=test` when
comparing with on-the-fly features.

Each output shard is written to a temporary file and renamed, then a `.done` record is
written (whole, or not at all): a killed extraction, run again, skips the shards already done.
Ranks (`--nproc`, started by `run_ranks`) split the shards. The index (`features-index.json`,
layout "features", with sha256 sums, every entry of the cache) is written once every shard is
done, so the reader verifies the cache like any shard set.

Shape legend: B images, R tokens, C tower width.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from setdiv import config as config_lib
from setdiv.data import remote
from setdiv.data.features import (
    CACHE_FILE,
    PREFIX,
    cache_name,
    check_cache,
    tower_identity,
    write_json_atomic,
)
from setdiv.data.loaders import resolve_shards
from setdiv.data.reader import EvalReader
from setdiv.data.samples import sample_options
from setdiv.data.shards import ShardIndex, ShardInfo, sha256_file
from setdiv.data.text import build_tokenizer
from setdiv.distributed import log_as_rank, process_group, rank_and_world, run_ranks
from setdiv.distributed.jobs import add_nproc_argument
from setdiv.errors import UserError, positive_int

__all__ = ["add_arguments", "extract_shards", "run", "write_indexes"]

log = logging.getLogger(__name__)
DONE = ".done"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the training config (its image tower and preprocessing)")
    p.add_argument("--data", required=True, help="shards to extract (brace pattern / glob)")
    p.add_argument("--out", required=True, help="the feature cache directory")
    add_nproc_argument(p, "processes splitting the shards")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds features of another tower, weights or transform: delete them first",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides")


def _done(out: Path, name: str) -> dict | None:
    """The record of cache entry `name` once it is complete (None before); a record that
    does not parse is an error naming it."""
    record = out / f"{name}{DONE}"
    if not record.is_file():
        return None
    try:
        done = json.loads(record.read_text())
        if not isinstance(done, dict):
            raise ValueError("not an object")
        int(done["samples"]), str(done["sha256"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{record}: a corrupt extraction record ({exc!s:.80}): delete it and {out / name} "
            "to extract that shard again"
        ) from None
    return done


def extract_shards(
    cfg: config_lib.Config, paths: list[str], fmt: str, out: Path, batch_size: int
) -> None:
    """Extract `paths` (skipping those already done) into `out`, one output shard each."""
    from setdiv.model.encoders import build_image_encoder

    encoder = build_image_encoder(cfg.model.image, cfg.model.embed_dim).eval()
    tokenizer = build_tokenizer(cfg.model.text)
    opts = sample_options(cfg.data, "image", tokenizer, train=False, augment=False)
    opts.format = fmt
    for path in paths:
        name = cache_name(path)
        if _done(out, name) is not None:
            log.info("%s: already extracted (%s)", path, name)
            continue
        tmp = out / f".{name}.{os.getpid()}.tmp"
        count, skipped = 0, 0
        with wds.TarWriter(str(tmp)) as sink, torch.no_grad():
            reader = EvalReader(str(path), opts, batch_size)
            for batch in reader:
                tokens = encoder.tokens(batch.images).to(torch.float16).numpy()
                first = 0
                for i, key in enumerate(batch.image_ids):
                    n = batch.caption_counts[i]
                    buf = io.BytesIO()
                    np.save(buf, tokens[i], allow_pickle=False)
                    meta = {
                        "image_id": key,
                        "captions": batch.captions[first : first + n],
                        "caption_ids": batch.caption_ids[first : first + n],
                    }
                    sink.write({"__key__": str(key), "npy": buf.getvalue(),
                                "json": json.dumps(meta).encode()})  # fmt: skip
                    first, count = first + n, count + 1
            skipped = reader.skipped
        tmp.replace(out / name)
        record = {
            "samples": count, "skipped": skipped, "sha256": sha256_file(out / name),
            "source": path if remote.is_remote(path) else str(Path(path).resolve()),
        }  # fmt: skip
        write_json_atomic(out / f"{name}{DONE}", record)
        log.info("%s: %d images extracted (%d skipped) -> %s", path, count, skipped, name)


def _worker(config: str, overrides: list[str], paths: list[str], fmt: str, out: Path,
            batch_size: int) -> None:  # fmt: skip
    """One rank: its share (every world-th) of the shards still to do."""
    with process_group() as job:
        log_as_rank(job)
        rank, world = rank_and_world()
        cfg = _config(config, overrides)
        extract_shards(cfg, paths[rank::world], fmt, out, batch_size)


def _config(config: str, overrides: list[str]) -> config_lib.Config:
    from setdiv.model.towers import with_tower_preprocessing

    cfg = with_tower_preprocessing(config_lib.load([config], overrides))
    if cfg.model.image.name != "timm":
        raise UserError(
            f"config key 'model.image.name' is {cfg.model.image.name!r}: setdiv extract caches "
            "timm towers (open_clip and the CNNs are not supported yet)"
        )
    return cfg


def _prepare(out: Path, identity: dict, overwrite: bool) -> None:
    """`out` ready for features of `identity`: created, a cache of other features refused
    (or, `overwrite`, its entries deleted), the identity recorded."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for record in out.glob(f"*{DONE}"):
            (out / record.name.removesuffix(DONE)).unlink(missing_ok=True)
            record.unlink()
        for stale in [*out.glob(f".{PREFIX}-*.tmp"), out / f"{PREFIX}-index.json"]:
            stale.unlink(missing_ok=True)
        (out / CACHE_FILE).unlink(missing_ok=True)
    check_cache(out, identity, "use another --out, or pass --overwrite to delete them first")
    write_json_atomic(out / CACHE_FILE, identity)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args.config, args.overrides)
    if cfg.model.image.weights is None:
        raise UserError(
            "config key 'model.image.weights' is null: a randomly initialised tower's features "
            "would differ in every process and run; give the weights file to extract with"
        )
    shards = resolve_shards(cfg.data, args.data, "image")
    sources = list({cache_name(p): p for p in shards.paths}.values())  # (each shard once)
    out = Path(args.out)
    _prepare(out, tower_identity(cfg), args.overwrite)
    todo = [p for p in sources if _done(out, cache_name(p)) is None]
    for p in todo:  # the partial output of a killed extraction
        for stale in out.glob(f".{cache_name(p)}.*.tmp"):
            stale.unlink()
    print(f"extract: {len(todo)} of {len(sources)} shard(s) to do -> {out}", flush=True)
    nproc = max(1, min(args.nproc, len(todo)))  # (a rank per shard at most)
    run_ranks(_worker, nproc, args.config, args.overrides, todo, shards.format, out,
              args.batch_size)  # fmt: skip
    write_indexes(out, cfg.model.image.arch or "")
    total = sum(_done(out, cache_name(p))["samples"] for p in sources)  # type: ignore[index]
    print(f"extract: {total} images in {len(sources)} shard(s) at {out}")
    return 0


def write_indexes(out: Path, arch: str) -> None:
    """`features-index.json` over every complete entry of the cache at `out` (this
    extraction's and earlier ones')."""
    index = ShardIndex(PREFIX, "regions", f"setdiv extract ({arch})", layout="features")
    for record in sorted(out.glob(f"{PREFIX}-*.tar{DONE}")):
        name = record.name.removesuffix(DONE)
        done = _done(out, name)
        index.shards.append(ShardInfo(name, done["samples"], done["sha256"]))  # type: ignore[index]
    index.save(out)
