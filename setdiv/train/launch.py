"""`setdiv train` and `setdiv export`: one training rank joins its job (spawned here, or
started by torchrun / SLURM / submitit, see `setdiv.distributed`) and runs the trainer."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from setdiv import config as config_lib
from setdiv.distributed import (
    is_rank_zero,
    job_from_env,
    log_as_rank,
    on_all_ranks,
    process_group,
    run_ranks,
    stop_on_sigterm,
)
from setdiv.distributed.jobs import add_nproc_argument
from setdiv.errors import UserError
from setdiv.model.towers import with_tower_preprocessing
from setdiv.train import rundir

__all__ = ["add_train_arguments", "run_train", "train"]

log = logging.getLogger(__name__)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (a delta over the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4")
    p.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints go")
    add_nproc_argument(p, "ranks to spawn on this machine", deprecated=["--nproc-per-node"])
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="RUN_DIR holds a run: delete its checkpoints, records and export, start again",
    )


def train(
    config: str | Path,
    overrides: Sequence[str],
    run_dir: str | Path,
    resume: str | None = None,
    overwrite: bool = False,
) -> None:
    """One rank of a training job: join the job the environment describes (within
    `train.dist_timeout`), claim the run directory (rank 0; see `setdiv.train.rundir`), train
    to the configured epochs, leave the job. SIGTERM stops the rank cleanly (a requeue or
    cancel: `distributed.stop_on_sigterm`). Every launcher ends up here."""
    from setdiv.train.trainer import Trainer

    job = job_from_env()
    log_as_rank(job)
    cfg = with_tower_preprocessing(config_lib.load([config], overrides))
    with (
        stop_on_sigterm("training"),
        process_group(job, timeout_s=cfg.train.dist_timeout),
        contextlib.ExitStack() as owned,
    ):
        on_all_ranks(
            lambda: (
                owned.enter_context(rundir.claim(run_dir, cfg, resume, overwrite))
                if is_rank_zero(job.rank)
                else None
            ),
            "claiming the run directory",
        )
        Trainer(cfg, run_dir, resume=resume).train()


def run_train(args: argparse.Namespace) -> int:
    config_lib.load([args.config], args.overrides)  # bad keys fail here, before any spawn
    if args.resume is not None and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    job_args = (args.config, list(args.overrides), args.run_dir, args.resume, args.overwrite)
    run_ranks(train, args.nproc, *job_args)
    return 0
