"""The learning-quality benchmark's independent reference (tools/bench_learning.py) computes the
method's similarity, losses and recalls as setdiv does: two implementations, one answer."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from setdiv import losses, similarity
from setdiv.eval.metrics import recall_at_k

TOOLS = Path(__file__).parents[1] / "tools"


@pytest.fixture(scope="module")
def ref():  # noqa: ANN201 -- the reference module
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module("learning_bench.reference")
    finally:
        sys.path.remove(str(TOOLS))


def test_the_reference_imports_nothing_from_setdiv() -> None:
    """Independent means independent: neither the reference nor what it imports from the
    benchmark package names setdiv."""
    for name in ("reference", "variants"):
        tree = ast.parse((TOOLS / "learning_bench" / f"{name}.py").read_text())
        imported = {
            alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
        } | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] == "setdiv"}, name
        assert {m for m in imported if m.startswith("learning_bench")} <= {
            "learning_bench.variants"
        }, name


def test_reference_agrees_with_setdiv_on_random_sets(ref) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    x = F.normalize(torch.randn(6, 4, 16), dim=-1)
    y = F.normalize(torch.randn(30, 4, 16), dim=-1)
    S = ref.smooth_chamfer(x, y, 16.0)
    torch.testing.assert_close(S, similarity.smooth_chamfer(x, y, 16.0), atol=1e-5, rtol=1e-5)
    ref._check_reference()  # docs/method.md §1 golden value
    pos = losses.positive_mask(6, 30)
    for hardest in (True, False):
        i2t, t2i = ref.triplet(S, 0.2, hardest)
        ours = losses.triplet_loss(S, pos, 0.2, "hardest" if hardest else "mean")
        torch.testing.assert_close(torch.stack([i2t, t2i]), torch.stack(list(ours.values())))
    px, py = x.reshape(-1, 16), y.reshape(-1, 16)
    torch.testing.assert_close(ref.mmd(px, py), losses.mmd_loss(px, py), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref.diversity(x), losses.diversity_loss(x))


def test_reference_recalls_match_setdiv_metrics(ref) -> None:  # noqa: ANN001
    sims = torch.randn(40, 200).numpy()
    sims[:, :5] += 3.0  # image 0 finds its captions
    got, want = ref.ref_recalls(sims), recall_at_k(sims)
    assert got == pytest.approx({k: want[k] for k in got})


def test_objective_table_keeps_the_share_of_the_clean_rsum() -> None:
    """The collected objective table: mean ± std over seeds per cell, and "kept" = the noisy
    (or dropout) mean over the clean mean, worked by hand; unmeasured rows print dashes."""
    sys.path.insert(0, str(TOOLS))
    try:
        report = importlib.import_module("learning_bench.report")
    finally:
        sys.path.remove(str(TOOLS))

    def run(variant: str, rsum: float, seed: int, noise: float = 0.0, dropout: str = "off"):
        return {
            "variant": variant,
            "dropout": dropout,
            "noise": noise,
            "seed": seed,
            "test": {"rsum": rsum},
        }

    results = [
        run("k4_sel", 400.0, 0),
        run("k4_sel", 410.0, 1),  # clean mean 405
        run("k4_sel", 360.0, 0, 0.2),
        run("k4_sel", 370.0, 1, 0.2),  # 365: 90%
        run("k4_sel", 202.5, 0, 0.5),  # 50%
        run("k4_sel", 324.0, 0, dropout="on"),  # 80%
        run("k4_rnce", 100.0, 0),
    ]
    rows = {
        line.split(" | ")[1]: line.split(" | ")
        for line in report.objective_tables(results).splitlines()
        if line.startswith("| 4 |")
    }
    sel = rows["**selective** (the default)"]
    assert sel[2] == "405.0 ± 7.1"  # sample std of (400, 410)
    assert sel[3:9] == ["365.0 ± 7.1", "90%", "202.5", "50%", "324.0", "80%"]
    assert sel[9].rstrip(" |") == "0,1"
    assert rows["official: hardest, 1 mean epoch first"][2] == "-"
    assert "robust InfoNCE (q 0.5)" in rows  # measured: shown
    assert "robust selective (q 0.5)" not in rows  # not measured: left out
