"""Shared fixtures: CPU DeepSpeed, deterministic seeds, tiny configs."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from setdiv import config as config_lib  # noqa: E402

TINY = [
    "model.embed_dim=16",
    "model.image.feature_dim=12",
    "model.text.word_dim=8",
    "model.text.hidden_dim=16",
    "model.image_set.num_heads=2",
    "model.image_set.head_dim=4",
    "model.text_set.num_heads=2",
    "model.text_set.head_dim=4",
]
"""Overrides that shrink any config to a model that builds and runs in milliseconds."""


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_config(*overrides: str, paths: tuple[str, ...] = ()) -> config_lib.Config:
    extra = (
        []
        if any(o.startswith("model.text.vocab_path") for o in overrides)
        else ["model.text.vocab_size=40"]
    )
    return config_lib.load(paths, [*TINY, *extra, *overrides])
