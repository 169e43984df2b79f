"""DeepSpeed glue: the only module that imports deepspeed.

Builds the DeepSpeed config from our typed config (ZeRO stage, bf16 / fp16 with dynamic loss
scaling, gradient clipping), wraps model + torch optimizer + LR schedule into an engine on the
process group `setdiv.distributed.process_group` joined, and reads consolidated fp32 weights
back out of a checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from setdiv.config import OptimConfig, TrainConfig

__all__ = [
    "consolidated_state_dict",
    "deepspeed_config",
    "initialize",
]

_REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"


def _environment() -> None:
    # CPU-only machines: DeepSpeed's CPU accelerator (gloo). Its shared-memory comm op is
    # JIT-compiled once; keep the build in a cache that outlives the run.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO_CACHE))


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
    if train.precision == "bf16":
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

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def consolidated_state_dict(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 model weights from a DeepSpeed checkpoint, without a process group: the ZeRO
    fp32 partitions merged (stages 1-3), or the module states (stage 0)."""
    _environment()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = Path(checkpoint_dir) / tag
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {root}")
    if list(root.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO / bf16: fp32 master copies
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:  # stage 0 without a master copy: the module itself holds the weights
        # DeepSpeed's own pickle inside this run's directory (not a file users exchange).
        blob = torch.load(
            root / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )
        state = blob["module"]
    return {k: v.float() for k, v in state.items()}
