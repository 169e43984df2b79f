"""`setdiv train` and `setdiv export`: start ranks (spawned locally, or from torchrun / SLURM
environment variables) and run the trainer."""

from __future__ import annotations

import argparse
import logging
import os

import torch.multiprocessing as mp

from setdiv import config as config_lib
from setdiv.distributed import world_info

__all__ = ["add_export_arguments", "add_train_arguments", "run_export", "run_train", "train_worker"]

log = logging.getLogger(__name__)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (a delta over the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4")
    p.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints go")
    p.add_argument("--nproc-per-node", type=int, default=1, help="local ranks to spawn")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")


def train_worker(local_rank: int, args: argparse.Namespace, port: int | None) -> None:
    """One rank: environment -> process group -> Trainer.train()."""
    from setdiv.train import engine as ds
    from setdiv.train.trainer import Trainer

    if port is not None:  # spawned by us: we define the job
        os.environ.update(
            RANK=str(local_rank),
            WORLD_SIZE=str(args.nproc_per_node),
            LOCAL_RANK=str(local_rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {world_info().rank}] %(levelname)s %(name)s: %(message)s"
    )
    cfg = config_lib.load([args.config], args.overrides)
    ds.init_distributed()
    Trainer(cfg, args.run_dir, resume=args.resume).train()


def run_train(args: argparse.Namespace) -> int:
    from setdiv.distributed import free_port

    config_lib.load([args.config], args.overrides)  # bad keys fail here, before any spawn
    if args.nproc_per_node > 1:
        mp.spawn(train_worker, args=(args, free_port()), nprocs=args.nproc_per_node, join=True)
        return 0
    external = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if not external:
        args.nproc_per_node = 1
    train_worker(0, args, None if external else free_port())
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest; e.g. best)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")


def run_export(args: argparse.Namespace) -> int:
    from setdiv.train.trainer import export_run

    out = export_run(args.run_dir, args.tag, args.out)
    print(f"exported {out}")
    return 0
