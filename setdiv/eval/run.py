"""`setdiv eval`: evaluate an exported model on test shards, on 1 or N local processes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import get_args

import numpy as np
import torch

from setdiv import config as config_lib
from setdiv.api import SetModel
from setdiv.data.loaders import build_eval_reader, resolve_shards
from setdiv.distributed import (
    all_reduce_sum,
    is_rank_zero,
    limit_cpu_threads,
    log_as_rank,
    pick_device,
    process_group,
    rank_and_world,
    run_ranks,
)
from setdiv.distributed.jobs import add_nproc_argument
from setdiv.errors import UserError
from setdiv.eval.evaluator import (
    STANDARD_SIZE,
    EvalResult,
    format_table,
    full_set_key,
    gather_and_score,
    write_result,
)
from setdiv.export import ExportedModel, find_export, load_exported
from setdiv.model.encoders import image_input_kind
from setdiv.paths import ExportFiles
from setdiv.similarity import build_similarity

__all__ = ["add_arguments", "evaluate_export", "run"]

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="export directory, its model.safetensors, or a run directory")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the export's similarity.* / data.* keys, e.g. similarity.alpha=8",
    )
    p.add_argument("--data", required=True, help="test shards (brace pattern or glob)")
    p.add_argument("--protocol", choices=get_args(config_lib.Protocol), required=True)
    add_nproc_argument(p, "local processes sharing the image rows")
    p.add_argument(
        "--out",
        default=None,
        help="output directory (default: CHECKPOINT/eval, or next to a weights file)",
    )
    p.add_argument("--block-size", type=int, default=None, help="override similarity.block_size")
    p.add_argument("--batch-size", type=int, default=None, help="override data.eval_batch_size")
    p.add_argument(
        "--analysis", action="store_true", help="circular variance, per-element RSUM, attention PNG"
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="score a test set some of whose images could not be read (not comparable)",
    )


def evaluate_export(
    exported: ExportedModel,
    data: str,
    protocol: str,
    device: torch.device,
    progress: bool = True,
    analysis: bool = False,
    allow_partial: bool = False,
) -> EvalResult | None:
    """Evaluate a loaded export on `data`; shards rows over the process group if one exists.
    Returns the result on rank 0 (or a lone process), None elsewhere. Raises ValueError, before
    scoring, if fewer images were read than the shard index lists, unless `allow_partial`."""
    cfg = exported.cfg
    rank, world = rank_and_world()
    kind = image_input_kind(cfg.model.image.name)
    reader = build_eval_reader(cfg.data, data, kind, exported.tokenizer, rank, world)
    loaded = SetModel(exported, device)
    model = loaded.model
    enc = loaded.encode_batches(reader, progress=progress and is_rank_zero(rank))
    expected = reader.shards.num_samples
    read = int(all_reduce_sum(torch.tensor([len(enc.image_ids)]))[0])
    _check_test_set(data, protocol, read, expected, allow_partial)
    similarity = build_similarity(cfg.similarity)
    result = gather_and_score(enc, similarity, cfg.data.eval_batch_size, protocol)
    if result is not None:
        check_finite(result.sims, exported.sha256)
    if analysis:
        from setdiv.eval.set_analysis import analyse

        analysis_out = analyse(model, reader, enc, similarity, device)
        if result is not None and analysis_out is not None:
            result.metrics["analysis"], result.figures = analysis_out
    if result is not None:
        s = cfg.similarity
        result.meta = {
            "similarity": {"name": s.name, "alpha": s.alpha, "mp_a": s.mp_a, "mp_b": s.mp_b},
            "checkpoint_sha256": exported.sha256,
            "data": data,
            "protocol": protocol,
            "processes": world,
            "images": read,
            "index_images": expected,
            "skipped_samples": expected - read,
        }
    return result


def check_finite(sims_NM: np.ndarray, sha256: str) -> None:
    """Refuse to report metrics over a similarity matrix with NaN / inf scores: they come
    from a broken model, and the recalls of such a matrix mean nothing."""
    bad = int((~np.isfinite(sims_NM)).sum())
    if bad:
        raise UserError(
            f"the similarity matrix holds {bad} non-finite scores of {sims_NM.size} (NaN/inf): "
            f"the model (sha256 {sha256[:12]}...) produces broken embeddings; no metrics reported"
        )


def _check_test_set(data: str, protocol: str, read: int, expected: int, partial: bool) -> None:
    """A test set must be whole (or `partial` allowed); one of another size than the
    protocol's is scored under its own name (`coco_76`), never silently."""
    if read < expected:
        msg = (
            f"{data}: {read} of the {expected} test images listed in the shard index could be "
            f"read ({expected - read} corrupt or missing, see the warnings above)"
        )
        if not partial:
            raise UserError(f"{msg}; metrics on a partial test set are not comparable: fix the "
                             "shards, or pass --allow-partial to score what was read")  # fmt: skip
        log.warning("%s; --allow-partial: scoring them anyway", msg)
    if protocol not in STANDARD_SIZE:  # web: any size
        return
    key, standard = full_set_key(protocol, read), full_set_key(protocol, STANDARD_SIZE[protocol])
    if key != standard:
        log.warning(
            "protocol %s is defined on %d test images, scored here on %d: the metrics are "
            "reported as %s, not comparable with published %s numbers",
            protocol, STANDARD_SIZE[protocol], read, key, standard,
        )  # fmt: skip


def _worker(args: argparse.Namespace) -> None:
    """One evaluation rank: join the job, encode and score its share, rank 0 writes."""
    with process_group() as job:
        log_as_rank(job)
        exported = load_exported(args.checkpoint)
        exported.cfg = config_lib.override(exported.cfg, _overrides(args))
        device = pick_device(job)
        limit_cpu_threads(device, exported.cfg.data.num_workers)
        result = evaluate_export(
            exported,
            args.data,
            args.protocol,
            device,
            analysis=args.analysis,
            allow_partial=args.allow_partial,
        )
        if result is not None:
            write_result(result, args.out)
            print(format_table(result.metrics, title=f"{args.checkpoint} on {args.data}"))
            print(f"wrote {args.out}/sims.npy, sims_meta.json, metrics.json")


EVAL_OVERRIDABLE = ("similarity.", "data.")
"""Evaluation may change how sets are compared and read, never the exported model."""


def _overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides, with --block-size / --batch-size as theirs."""
    flags = [
        f"{key}={value}"
        for key, value in (
            ("similarity.block_size", args.block_size),
            ("data.eval_batch_size", args.batch_size),
        )
        if value is not None
    ]
    return [*args.overrides, *flags]


def run(args: argparse.Namespace) -> int:
    """Check everything that can be checked before any work -- overrides, export, shards and
    their checksums, the output directory -- then evaluate on 1 or `--nproc` processes."""
    for item in args.overrides:
        if not item.startswith(EVAL_OVERRIDABLE):
            raise config_lib.ConfigError(
                f"eval override '{item}': only similarity.* and data.* keys can be changed "
                "(the model is the exported one)"
            )
    root = find_export(args.checkpoint)
    cfg = config_lib.override(config_lib.load([ExportFiles(root).config]), _overrides(args))
    shards = resolve_shards(cfg.data, args.data)
    if cfg.data.verify_checksums:
        shards.verify()
    checkpoint = Path(args.checkpoint)
    out = (
        Path(args.out)
        if args.out
        else (checkpoint.parent if checkpoint.is_file() else checkpoint) / "eval"
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the output directory: {exc}") from None
    args.out = str(out)
    run_ranks(_worker, args.nproc, args)
    return 0
