"""The training sections: the optimizer and its parameter groups (`optim.*`) and the run
itself (`train.*`: epochs, precision, ZeRO, checkpoints, the guards). docs/training.md explains
the recipes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from setdiv.config.objective import CollapseConfig
from setdiv.config.rules import non_negative, positive, ruled

__all__ = ["LR_GROUPS", "OptimConfig", "ParamGroup", "TrainConfig"]

LR_GROUPS = {
    "image_backbone": 1.0,
    "image_head": 0.1,
    "image_set": 0.1,
    "text_backbone": 1.0,
    "text_encoder": 1.0,
    "text_set": 0.1,
    "objective": 1.0,
}
"""Parameter groups and their LR multipliers in the official train.py: the image encoder's
non-CNN part shares `img_pie_lr_scale` with the image set module, the text set module has
`txt_pie_lr_scale`, the text encoder (BERT included) `txt_lr_scale`, the CNN x1. Plus the
objective's own parameters (InfoNCE's temperature: x1, no weight decay, as CLIP's)."""

ParamGroup = Literal[tuple(LR_GROUPS)]


def _lr_mults(mult: dict[str, float]) -> str | None:
    unknown = sorted(set(mult) - set(LR_GROUPS))
    if unknown:
        return f"unknown parameter group(s) {unknown}; groups: {sorted(LR_GROUPS)}"
    return None if all(v >= 0 for v in mult.values()) else "multipliers must be >= 0"


@dataclass
class OptimConfig:
    lr: float = positive(1e-3)
    """Base learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_mult: dict[str, float] = field(
        default_factory=lambda: dict(LR_GROUPS), metadata={"check": _lr_mults}
    )
    """LR multiplier (>= 0) per parameter group (`setdiv info` lists the groups with their
    sizes): image_backbone (CNN), image_head (projection + residual MLP of the image encoder),
    image_set, text_backbone (BERT), text_encoder (word vectors + bi-GRU, or BERT's projection),
    text_set, objective (InfoNCE's temperature). Keys left out keep their defaults, the
    official script's values."""
    schedule: Literal["cosine", "step"] = "cosine"
    """cosine (annealed per iteration over all epochs) | step (x step_gamma every step_epochs)."""
    step_epochs: int = positive(10)
    """step: epochs between LR decays."""
    step_gamma: float = 0.1
    """step: decay factor."""
    warmup_iters: int = non_negative(0)
    """Linear LR warm-up iterations before the schedule."""
    freeze_epochs: int = non_negative(0)
    """The groups in `freeze_groups` get no gradient and no optimizer update during the first
    E epochs; their optimizer state starts fresh when they unfreeze."""
    freeze_groups: list[ParamGroup] = field(default_factory=lambda: ["image_backbone"])
    """Parameter groups frozen during the first `freeze_epochs` (official: the CNN only)."""
    grad_clip: float = non_negative(1.0)
    """Max global gradient norm; 0 disables clipping."""


@dataclass
class TrainConfig:
    epochs: int = positive(80)
    """Training epochs."""
    seed: int = 0
    """Seed of model init, data order and dropout."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast with fp32 weights and optimizer state, as the official code (fp16 adds dynamic
    loss scaling); similarities, the loss and LayerNorms run in fp32."""
    half_weights: bool = False
    """Keep the parameters themselves in bf16 / fp16 (DeepSpeed's bf16 / fp16 modes, fp32
    master copies in the optimizer): less memory for memory-bound models, not the recipe."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    log_every: int = positive(20)
    """Steps between metrics.jsonl / TensorBoard records."""
    ckpt_every: int = positive(1000)
    """Steps between checkpoints (plus one at every epoch end)."""
    keep_last: int = positive(3)
    """Checkpoints kept besides `best`."""
    remote_dir: str | None = None
    """An fsspec URL (s3://bucket/runs/x, gs://..., file:///shared/x) that receives every step
    checkpoint in the background once it is complete, with the run's config, vocabulary and
    records; `--resume latest` in an empty run directory resumes from its latest
    (docs/reliability.md). null: checkpoints stay in the run directory only."""
    max_nonfinite: int = positive(5)
    """Consecutive non-finite losses (each step skipped) after which training stops."""
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    """What the trainer does when the batch's scores collapse to a constant."""
    dist_timeout: float = ruled(
        300.0, lambda v: None if 0 < v < math.inf else "must be > 0 seconds and finite"
    )
    """Seconds the ranks of a job wait for each other at the rendezvous before failing with a
    message naming the master address and port (collectives keep torch's own timeout)."""

    def _conflict(self) -> tuple[str, str] | None:
        if self.half_weights and self.precision == "fp32":
            return "half_weights", "needs train.precision bf16 or fp16, not fp32"
        return None
