"""The learning-quality benchmark's independent reference (tools/bench_learning.py) computes the
method's similarity, losses and recalls as setdiv does: two implementations, one answer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from setdiv import losses, similarity
from setdiv.eval.metrics import recall_at_k

TOOL = Path(__file__).parents[1] / "tools" / "bench_learning.py"


@pytest.fixture(scope="module")
def ref():  # noqa: ANN201 -- the tool module
    spec = importlib.util.spec_from_file_location("bench_learning", TOOL)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["bench_learning"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_reference_agrees_with_setdiv_on_random_sets(ref) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    x = F.normalize(torch.randn(6, 4, 16), dim=-1)
    y = F.normalize(torch.randn(30, 4, 16), dim=-1)
    S = ref.smooth_chamfer(x, y, 16.0)
    torch.testing.assert_close(S, similarity.smooth_chamfer(x, y, 16.0), atol=1e-5, rtol=1e-5)
    ref._check_reference()  # SPEC §1 golden value
    pos = losses.positive_mask(6, 30)
    for hardest in (True, False):
        i2t, t2i = ref.triplet(S, 0.2, hardest)
        ours = losses.triplet_loss(S, pos, 0.2, hardest=hardest)
        torch.testing.assert_close(torch.stack([i2t, t2i]), torch.stack(list(ours.values())))
    px, py = x.reshape(-1, 16), y.reshape(-1, 16)
    torch.testing.assert_close(ref.mmd(px, py), losses.mmd_loss(px, py), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref.diversity(x), losses.diversity_loss(x))


def test_reference_recalls_match_setdiv_metrics(ref) -> None:  # noqa: ANN001
    sims = torch.randn(40, 200).numpy()
    sims[:, :5] += 3.0  # image 0 finds its captions
    got, want = ref.ref_recalls(sims), recall_at_k(sims)
    assert got == pytest.approx({k: want[k] for k in got})
