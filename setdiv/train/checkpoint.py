"""Checkpoints: the only place that knows their layout.

    RUN/checkpoints/step00001234/   DeepSpeed engine state (model, optimizer, scheduler,
                                    loss scaler; ZeRO partitions) + client state
                                    + rng_rank{r}.pt for every rank
    RUN/checkpoints/latest          name of the newest complete checkpoint
    RUN/checkpoints/best/           the checkpoint with the best validation RSUM

Every rank writes its part, then after a barrier rank 0 points `latest` at the new tag with
an atomic rename: a crash mid-write leaves `latest` on the previous complete checkpoint.
Only the newest `keep_last` step checkpoints are kept (plus `best`).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from setdiv.distributed import is_initialized, rank_and_world

__all__ = ["TrainState", "latest_tag", "load", "save", "step_tag"]


@dataclass
class TrainState:
    epoch: int = 0
    """Epoch in progress (or the next one, with batch_in_epoch = 0)."""
    batch_in_epoch: int = 0
    """Batches of `epoch` already consumed: where the data stream resumes."""
    step: int = 0
    """Training steps taken (batches consumed, skipped non-finite ones included)."""
    nonfinite_steps: int = 0
    """Steps skipped because the loss was not finite."""
    skipped_samples: int = 0
    """Corrupt samples the readers skipped so far."""
    best_rsum: float = float("-inf")
    world_size: int = 1
    """Ranks of the run: the data plan depends on it, so a resume must use the same number."""


def _barrier() -> None:
    if is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }


def _set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"].numel():
        torch.cuda.set_rng_state(s["cuda"])
    pos, has_gauss = (int(v) for v in s["numpy_pos"])
    np.random.set_state(
        (
            "MT19937",
            s["numpy_keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            float(s["numpy_gauss"][0]),
        )
    )
    random.setstate((3, tuple(int(v) for v in s["python"]), None))


def _root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    f = _root(run_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


def save(
    engine: Any, run_dir: Path, state: TrainState, keep_last: int, tag: str | None = None
) -> str:
    """Checkpoint on every rank; returns the tag. `tag="best"` replaces the best checkpoint."""
    root = _root(run_dir)
    rank, _ = rank_and_world()
    final = tag or step_tag(state.step)
    writing = f"{final}.tmp" if final == "best" else final
    engine.save_checkpoint(
        str(root), tag=writing, client_state={"train_state": asdict(state)}, save_latest=False
    )
    torch.save(_rng_state(), root / writing / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        if final == "best":  # swap in with renames: a crash leaves best or best.old intact
            if (root / "best").exists():
                shutil.rmtree(root / "best.old", ignore_errors=True)
                os.replace(root / "best", root / "best.old")
            os.replace(root / writing, root / "best")
            shutil.rmtree(root / "best.old", ignore_errors=True)
        else:
            tmp = root / "latest.tmp"
            tmp.write_text(final)
            os.replace(tmp, root / "latest")
            steps = sorted(p for p in root.glob("step*") if p.is_dir())
            for old in steps[: max(len(steps) - keep_last, 0)]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(engine: Any, run_dir: Path, which: str) -> TrainState | None:
    """Restore engine, RNG and train state from `latest`, a tag, or a checkpoint directory.
    Returns None when `which == "latest"` and there is nothing to resume."""
    root = _root(run_dir)
    if which == "latest":
        tag = latest_tag(run_dir)
        if tag is None:
            return None
    else:
        p = Path(which)
        root, tag = (p.parent, p.name) if p.is_dir() else (root, which)
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"checkpoint not found: {root / tag}")
    _, client = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise ValueError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    rank, world = rank_and_world()
    state = TrainState(**client["train_state"])
    if state.world_size != world:
        raise ValueError(
            f"{root / tag} was written by {state.world_size} ranks, this job has {world}: "
            "resume with the same number of ranks (the data order depends on it)"
        )
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state
