"""Parameter groups with LR multipliers, the LR schedule, and backbone freezing (docs/method.md §5).

The groups follow the official train.py: the CNN, the image head (the image encoder without
its CNN), the image set module, BERT, the rest of the text encoder, the text set module; plus
the objective's own parameters (InfoNCE's temperature), once the trainer attaches the loss to
the model as `objective`. Each has its own multiplier (`optim.lr_mult`); `setdiv info` lists
them with their sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from setdiv.config import LR_GROUPS, OptimConfig
from setdiv.model import SetRetrievalModel

__all__ = [
    "build_optimizer",
    "group_lr_lambdas",
    "group_parameters",
    "lr_lambda",
    "param_groups",
]


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    return list(module.parameters()) if module is not None else []


def _minus(module: nn.Module, part: nn.Module | None) -> list[nn.Parameter]:
    skip = {id(p) for p in _params(part)}
    return [p for p in module.parameters() if id(p) not in skip]


def group_parameters(model: SetRetrievalModel) -> dict[str, list[nn.Parameter]]:
    """Every parameter of `model` in exactly one named group (names as `LR_GROUPS`); groups
    the architecture lacks (no CNN, no BERT) are empty."""
    image_backbone = model.image_encoder.backbone
    text_backbone = model.text_encoder.backbone
    groups = {
        "image_backbone": _params(image_backbone),
        "image_head": _minus(model.image_encoder, image_backbone),
        "image_set": _params(model.image_set),
        "text_backbone": _params(text_backbone),
        "text_encoder": _minus(model.text_encoder, text_backbone),
        "text_set": _params(model.text_set),
        "objective": _params(getattr(model, "objective", None)),
    }
    assert list(groups) == list(LR_GROUPS)
    counted = sum(len(ps) for ps in groups.values())
    if counted != len(list(model.parameters())):
        raise AssertionError("a parameter is in no group or in two: update group_parameters")
    return groups


NO_WEIGHT_DECAY = frozenset({"objective"})
"""Groups AdamW does not decay: a temperature is no weight (CLIP leaves its logit scale out)."""


def param_groups(model: SetRetrievalModel, cfg: OptimConfig) -> list[dict]:
    """Optimizer param groups: one per non-empty named group, `lr = optim.lr x lr_mult[name]`
    (the `NO_WEIGHT_DECAY` groups with weight decay 0)."""
    mult = {**LR_GROUPS, **cfg.lr_mult}
    return [
        {"params": ps, "name": name, "lr": cfg.lr * mult[name], "lr_mult": mult[name]}
        | ({"weight_decay": 0.0} if name in NO_WEIGHT_DECAY else {})
        for name, ps in group_parameters(model).items()
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
    """One multiplier per param group: `lr_lambda`, and 0 for the `freeze_groups` during the
    first `freeze_epochs` epochs. (The trainer also takes their gradients away then; the LR
    of 0 keeps AdamW's decoupled weight decay off them too.)"""
    base = lr_lambda(cfg, iters_per_epoch, epochs)
    frozen_iters = cfg.freeze_epochs * iters_per_epoch

    def frozen(it: int) -> float:
        return 0.0 if it < frozen_iters else base(it)

    return [frozen if g["name"] in cfg.freeze_groups else base for g in groups]
