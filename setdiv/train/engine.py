"""DeepSpeed glue: the only module that imports deepspeed.

Builds the DeepSpeed config from our typed config (ZeRO stage; bf16 / fp16 as autocast over
fp32 weights, or as half-precision weights; gradient clipping), wraps model + torch optimizer +
LR schedule into an engine on the process group `setdiv.distributed.process_group` joined,
resets a param group's optimizer state, and merges a ZeRO checkpoint's fp32 partitions
(`setdiv.train.checkpoint` knows which files a checkpoint holds).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from setdiv.config import OptimConfig, TrainConfig

__all__ = ["deepspeed_config", "initialize", "reset_optimizer_state", "zero_fp32_state_dict"]

_REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"


def _environment() -> None:
    # CPU-only machines: DeepSpeed's CPU accelerator (gloo). Its shared-memory comm op (for
    # several ranks on one machine) is JIT-compiled once; keep the build in a cache that
    # outlives the run.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO_CACHE))


@contextlib.contextmanager
def _no_shared_memory_op_for_one_rank() -> Iterator[None]:
    """A lone CPU rank has no peer to share memory with: DeepSpeed's communication backend is
    set up without its shared-memory op, which would otherwise be JIT-compiled (about two
    minutes on a fresh 2-core machine, after importing torch's C++ extension machinery and its
    "No CUDA runtime" warning) and never used. Several ranks, or a GPU, keep DeepSpeed's own
    choice."""
    import torch.distributed as dist

    lone = not dist.is_initialized() or dist.get_world_size() == 1
    if torch.cuda.is_available() or not lone:
        yield
        return
    # deepspeed==0.19.8 (pinned): build_shm_op() in deepspeed/comm/torch.py (the module, not
    # the `torch` that `deepspeed.comm` re-exports under the same attribute name)
    ds_torch = importlib.import_module("deepspeed.comm.torch")

    built = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = built


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for one rank processing `micro_batch` images per step."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train.zero_stage},
        "gradient_clipping": optim.grad_clip,
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if train.precision != "fp32" and not train.half_weights:
        # The official recipe: autocast over fp32 weights, gradients and optimizer state (fp16
        # adds a GradScaler). No module is marked lower-precision-safe, so gradients are also
        # reduced in fp32, as the official DDP did.
        cfg["torch_autocast"] = {
            "enabled": True,
            "dtype": {"bf16": "bfloat16", "fp16": "float16"}[train.precision],
            "lower_precision_safe_modules": [],
        }
    elif train.precision == "bf16":  # half_weights: bf16 parameters, fp32 master copies
        cfg["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
        }
    return cfg


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ds_config: dict[str, Any],
) -> Any:
    """A DeepSpeed engine around model / optimizer / per-step scheduler, on the torch process
    group already joined (DeepSpeed wraps it instead of starting its own)."""
    _environment()
    import deepspeed

    with _no_shared_memory_op_for_one_rank():
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
    return engine


def reset_optimizer_state(engine: Any, group_index: int) -> int:
    """Drop the optimizer state (AdamW moments and step) of param group `group_index`, so it
    starts fresh at its next update. Works for the plain torch optimizer (ZeRO 0) and for the
    DeepSpeed wrappers (ZeRO 1-3, bf16 / fp16 weights), whose inner torch optimizer holds one
    flat fp32 partition per param group. Returns how many state entries were dropped."""
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        # ZeRO-3 hands the inner optimizer one sub-group partition at a time (its param
        # groups are empty in between): the state is keyed by those partitions.
        held = [
            flat
            for sub, flat in enumerate(wrapper.fp32_partitioned_groups_flat)
            if wrapper.sub_group_to_group_id[sub] == group_index
        ]
    else:
        held = list(inner.param_groups[group_index]["params"])
    return sum(inner.state.pop(p, None) is not None for p in held)


def zero_fp32_state_dict(checkpoint_root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 model weights merged from the ZeRO partitions of checkpoint `tag` under
    `checkpoint_root`, without a process group (DeepSpeed's zero_to_fp32)."""
    _environment()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=tag)
