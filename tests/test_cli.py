"""`setdiv info`: model summary with parameter counts, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from setdiv import cli
from setdiv import config as config_lib
from setdiv.model import build_model

ROOT = Path(__file__).parents[1]


def test_info_prints_parameter_counts_per_module(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(ROOT / "configs/demo.yaml")]) == 0
    out = capsys.readouterr().out
    model = build_model(config_lib.load([ROOT / "configs/demo.yaml"]).model)
    total = sum(p.numel() for p in model.parameters())
    image_set = sum(p.numel() for p in model.image_set.parameters())
    assert re.search(rf"^model\s+SetRetrievalModel\s+{total:,}\s+{total:,}$", out, re.M)
    assert re.search(rf"^\s+image_set\s+SlotSetModule\s+{image_set:,}", out, re.M)


@pytest.mark.parametrize("name", ["roi_bigru", "resnet_bigru", "resnext_bert"])
def test_paper_configs_build_offline_with_tiny_dims(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = [
        "model.embed_dim=16",
        "model.text.hidden_dim=16",
        "model.image_set.head_dim=4",
        "model.text_set.head_dim=4",
    ]
    assert (
        cli.main(
            ["info", str(ROOT / f"configs/{name}.yaml"), *tiny, "--random-init", "--depth", "1"]
        )
        == 0
    )
    assert "SetRetrievalModel" in capsys.readouterr().out


def test_info_errors_name_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", str(ROOT / "configs/roi_bigru.yaml")]) == 2
    assert "model.text.vocab_path" in capsys.readouterr().err
    assert cli.main(["info", str(ROOT / "configs/demo.yaml"), "model.image.nme=x"]) == 2
    assert "model.image.nme" in capsys.readouterr().err
