"""`setdiv demo`, the README's main job: the set model beats the single embedding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from setdiv import cli


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_set_model_beats_single_embedding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["rows"]
    k4, k1 = rows["set K=4 (smooth-Chamfer)"], rows["single K=1 (cosine)"]
    assert k4["rsum"] > k1["rsum"]
    # Slots specialise: every slot's largest attention weight is above uniform attention on
    # average, and on the whole well above it (images hold 2-5 objects among 8 regions).
    spec = summary["specialisation"]
    peaks, uniform = spec["slot_max_attention"], spec["uniform"]
    assert len(peaks) == 4 and min(peaks) > uniform, (peaks, uniform)
    assert sum(peaks) / len(peaks) > 1.5 * uniform, (peaks, uniform)
    for png in ("attention.png", "specialisation.png", "curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "RSUM gain of the set model over the single embedding" in out
