"""Parameter groups, LR schedules and backbone freezing against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from setdiv.config import OptimConfig
from setdiv.model import build_model
from setdiv.train.optim import build_optimizer, group_lr_lambdas, lr_lambda, param_groups


def test_param_groups_and_lr_multipliers() -> None:
    model = build_model(tiny_config("model.image.name=resnet152").model)
    cfg = OptimConfig(lr=1e-3, lr_mult={"image_backbone": 0.5, "text_set": 0.2})
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    lrs = {k: g["lr"] for k, g in groups.items()}  # unnamed groups keep the official multiplier
    assert lrs == pytest.approx(
        {"image_backbone": 5e-4, "image_head": 1e-4, "image_set": 1e-4, "text_encoder": 1e-3}
        | {"text_set": 2e-4}
    )
    n = {k: sum(p.numel() for p in g["params"]) for k, g in groups.items()}
    assert n["image_backbone"] == sum(p.numel() for p in model.image_encoder.backbone.parameters())
    assert n["image_head"] == sum(p.numel() for p in model.image_encoder.head.parameters())
    assert n["text_set"] == sum(p.numel() for p in model.text_set.parameters())
    assert sum(n.values()) == sum(p.numel() for p in model.parameters())
    region = build_model(tiny_config().model)  # no backbone: no empty group
    assert [g["name"] for g in param_groups(region, cfg)] == [
        "image_head",
        "image_set",
        "text_encoder",
        "text_set",
    ]


def test_cosine_per_iteration_and_warmup() -> None:
    f = lr_lambda(OptimConfig(schedule="cosine"), iters_per_epoch=10, epochs=4)
    assert f(0) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.5)
    assert f(13) == pytest.approx(0.5 * (1 + math.cos(math.pi * 13 / 40)))
    assert f(40) == pytest.approx(0.0, abs=1e-12)
    w = lr_lambda(OptimConfig(schedule="cosine", warmup_iters=4), 10, 4)
    assert w(0) == pytest.approx(0.25 * 1.0) and w(3) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 3 / 40))
    )


def test_step_schedule() -> None:
    f = lr_lambda(
        OptimConfig(schedule="step", step_epochs=2, step_gamma=0.1), iters_per_epoch=5, epochs=6
    )
    assert [f(i) for i in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_backbone_frozen_for_first_epochs_through_the_optimizer() -> None:
    model = build_model(tiny_config("model.image.name=resnet152").model)
    cfg = OptimConfig(lr=1e-2, freeze_epochs=1, schedule="step", step_epochs=100)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, group_lr_lambdas(cfg, opt.param_groups, 2, 3))
    conv = model.image_encoder.backbone[0].weight
    head = model.image_encoder.head.fc.weight
    for it in range(3):
        before_conv, before_head = conv.detach().clone(), head.detach().clone()
        opt.zero_grad()
        out = model.encode_image(torch.randn(2, 3, 64, 64))
        out.embeds.square().sum().backward()
        opt.step()
        sched.step()
        assert not torch.equal(head, before_head)
        assert torch.equal(conv, before_conv) == (it < 2), it  # frozen for epoch 0 (2 iterations)
