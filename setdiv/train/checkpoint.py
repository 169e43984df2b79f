"""Checkpoints: the only place that knows their layout.

    RUN/checkpoints/step00001234/   DeepSpeed engine state (model, optimizer, scheduler,
                                    loss scaler; ZeRO partitions) + client state
                                    + rng_rank{r}.pt for every rank
        *zero_pp_rank_*optim_states.pt   ZeRO / half weights: the fp32 master partitions
        mp_rank_00_model_states.pt       the module's weights (ZeRO 0: the fp32 weights)
    RUN/checkpoints/latest          name of the newest complete checkpoint
    RUN/checkpoints/best/           the checkpoint with the best validation RSUM

Every rank writes its part, then after a barrier rank 0 points `latest` at the new tag with
an atomic rename: a crash mid-write leaves `latest` on the previous complete checkpoint.
Only the newest `keep_last` step checkpoints are kept (plus `best`). `Checkpointer` decides
when the trainer saves; `consolidated_weights` reads a checkpoint's fp32 weights back out.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from setdiv.distributed import is_initialized, is_rank_zero, rank_and_world
from setdiv.errors import UserError
from setdiv.paths import RunFiles
from setdiv.train import engine as ds
from setdiv.train.remote_store import RemoteCheckpoints

__all__ = [
    "Checkpointer",
    "TrainState",
    "consolidated_weights",
    "latest_tag",
    "load",
    "save",
    "step_tag",
]

_ZERO_OPTIM_STATES = "*zero_pp_rank_*optim_states.pt"
_MODEL_STATES = "mp_rank_00_model_states.pt"


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
    data_retries: int = 0
    """Failed reads of remote shards retried so far (`setdiv.data.remote`)."""
    best_rsum: float = float("-inf")
    world_size: int = 1
    """Ranks of the run: the data plan depends on it, so a resume must use the same number."""
    data_positions: list[int] = field(default_factory=list)
    """Per rank, the positions of `epoch` (good and corrupt samples) read by `batch_in_epoch`:
    where each rank's data stream resumes (empty at an epoch boundary)."""
    collapse: dict = field(default_factory=dict)
    """The collapse guard's state (`setdiv.train.watch.CollapseGuard.state`)."""


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
    return RunFiles(run_dir).checkpoints


def step_tag(step: int) -> str:
    """The tag of the checkpoint taken after `step` training steps."""
    return f"step{step:08d}"


def latest_tag(run_dir: Path) -> str | None:
    """The tag `latest` points at (the newest complete checkpoint), or None without one."""
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
    if is_rank_zero(rank):
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
        raise UserError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    rank, world = rank_and_world()
    state = TrainState(**client["train_state"])
    if state.world_size != world:
        raise UserError(
            f"{root / tag} was written by {state.world_size} ranks, this job has {world}: "
            "resume with the same number of ranks (the data order depends on it)"
        )
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def consolidated_weights(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 model weights of checkpoint `tag` (None or "latest": the newest complete one),
    without a process group: the ZeRO fp32 partitions merged (stages 1-3, half weights), or the
    module states (stage 0)."""
    run_dir = Path(run_dir)
    if tag in (None, "latest"):
        tag = latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export")
    root = _root(run_dir)
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"checkpoint not found: {root / tag}")
    if list((root / tag).glob(_ZERO_OPTIM_STATES)):  # ZeRO / half weights: fp32 master copies
        state = ds.zero_fp32_state_dict(root, tag)
    else:  # stage 0 without a master copy: the module itself holds the weights
        # DeepSpeed's own pickle inside this run's directory (not a file users exchange).
        blob = torch.load(root / tag / _MODEL_STATES, map_location="cpu", weights_only=False)
        state = blob["module"]
    return {k: v.float() for k, v in state.items()}


class Checkpointer:
    """One run's checkpoints for the trainer: restores them, saves them, and decides when --
    every `every` steps and at every epoch end."""

    def __init__(
        self, engine: Any, run_dir: Path, every: int, keep_last: int,
        remote_dir: str | None = None,
    ) -> None:  # fmt: skip
        self.engine, self.run_dir = engine, Path(run_dir)
        self.every, self.keep_last = every, keep_last
        self.remote = RemoteCheckpoints(remote_dir, self.run_dir, keep_last) if remote_dir else None
        """The uploader to `train.remote_dir` (given on rank 0 only), or None."""

    def load(self, which: str) -> TrainState | None:
        """Restore from `latest`, a tag or a checkpoint directory (see `load`)."""
        return load(self.engine, self.run_dir, which)

    def should_save(self, step: int) -> bool:
        """Whether the step just taken ends with a step checkpoint."""
        return step % self.every == 0

    def should_save_epoch_end(self, step: int) -> bool:
        """An epoch ends at `step`: save, unless this step was just saved (`latest` must never
        point at a directory being rewritten in place). Resuming from the step checkpoint of
        an epoch's last batch simply finds that epoch's stream exhausted."""
        return latest_tag(self.run_dir) != step_tag(step)

    def save(self, state: TrainState, tag: str | None = None) -> str:
        """Checkpoint on every rank (a step tag, or `best`); returns the tag. A step
        checkpoint is then queued for upload to the remote store, if any."""
        tag = save(self.engine, self.run_dir, state, self.keep_last, tag=tag)
        if self.remote is not None and tag != "best":
            self.remote.submit(tag)
        return tag

    def flush(self) -> None:
        """Wait for the uploads to the remote store (the end of a training)."""
        if self.remote is not None:
            self.remote.flush()

    def latest_path(self) -> Path | None:
        """The newest complete checkpoint's directory, or None before the first."""
        tag = latest_tag(self.run_dir)
        return None if tag is None else _root(self.run_dir) / tag
