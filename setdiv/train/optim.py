"""Parameter groups with LR multipliers, the LR schedule, and backbone freezing (SPEC §5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from setdiv.config import OptimConfig
from setdiv.model import SetRetrievalModel

__all__ = ["build_optimizer", "group_lr_lambdas", "lr_lambda", "param_groups"]


def param_groups(model: SetRetrievalModel, cfg: OptimConfig) -> list[dict]:
    """Three groups: set modules (x set_module_lr_mult), pretrained backbones
    (x backbone_lr_mult), everything else (x1). Empty groups are dropped."""
    set_ids = {id(p) for m in (model.image_set, model.text_set) for p in m.parameters()}
    backbone_ids = {id(p) for b in model.backbones() for p in b.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"set_modules": [], "backbones": [], "rest": []}
    for p in model.parameters():
        key = (
            "set_modules" if id(p) in set_ids else "backbones" if id(p) in backbone_ids else "rest"
        )
        groups[key].append(p)
    mult = {"set_modules": cfg.set_module_lr_mult, "backbones": cfg.backbone_lr_mult, "rest": 1.0}
    return [
        {"params": ps, "name": k, "lr": cfg.lr * mult[k], "lr_mult": mult[k]}
        for k, ps in groups.items()
        if ps
    ]


def build_optimizer(model: SetRetrievalModel, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (a plain torch optimizer: no JIT-compiled kernels)."""
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )


def lr_lambda(cfg: OptimConfig, iters_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """Multiplier of each group's base LR at iteration `it` (0-based): linear warm-up, then
    cosine annealing per iteration over all epochs, or x step_gamma every step_epochs."""
    total = max(iters_per_epoch * epochs, 1)

    def f(it: int) -> float:
        warm = min(1.0, (it + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(it, total) / total))
        return warm * cfg.step_gamma ** (it // (iters_per_epoch * cfg.step_epochs))

    return f


def group_lr_lambdas(
    cfg: OptimConfig, groups: list[dict], iters_per_epoch: int, epochs: int
) -> list[Callable[[int], float]]:
    """One multiplier per param group: `lr_lambda`, and 0 for the backbones during the first
    `backbone_freeze_epochs` epochs (an LR of 0 freezes them without changing which
    parameters the (ZeRO-partitioned) optimizer holds)."""
    base = lr_lambda(cfg, iters_per_epoch, epochs)
    frozen_iters = cfg.backbone_freeze_epochs * iters_per_epoch

    def backbone(it: int) -> float:
        return 0.0 if it < frozen_iters else base(it)

    return [backbone if g["name"] == "backbones" else base for g in groups]
