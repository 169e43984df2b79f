"""cluster/ensemble.py: a 2-seed ensemble on synthetic data through Ray (training as Tune
trials, evaluation as Ray tasks passing paths), then the same through the local backend, which
finds both runs finished and only evaluates; single and ensemble RSUM printed, the ensemble
matrix the mean of the singles, its RSUM equal to a naive recount; nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_helpers import (
    RAY_ENV,
    ROOT,
    launches,
    processes_mentioning,
    tiny_overrides,
    wait_groups_gone,
    write_data,
)

ENSEMBLE = [sys.executable, str(ROOT / "cluster" / "ensemble.py")]


def naive_rsum(sims: np.ndarray) -> float:
    """R@1/5/10 both ways by explicit loops (caption c belongs to image c // 5)."""
    n = sims.shape[0]
    i2t, t2i = [], []
    for i in range(n):
        order = sorted(range(5 * n), key=lambda c: (-sims[i, c], c))
        i2t.append(min(order.index(c) for c in range(5 * i, 5 * i + 5)))
    for c in range(5 * n):
        order = sorted(range(n), key=lambda i: (-sims[i, c], i))
        t2i.append(order.index(c // 5))
    return sum(100 * np.mean([r < k for r in ranks]) for ranks in (i2t, t2i) for k in (1, 5, 10))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_two_seed_ensemble_through_ray_then_local(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", train=256, test=64)
    exp = tmp_path / "ens" / "e"
    command = [
        *ENSEMBLE, "configs/demo.yaml", *tiny_overrides(data, epochs=2),
        "--seeds", "0,1", "--test-data", f"{data}/test-*.tar", "--protocol", "coco",
        "--storage", str(tmp_path / "ens"), "--name", "e", "--num-cpus", "2", "--num-gpus", "0",
    ]  # fmt: skip
    r = subprocess.run(
        [*command, "--backend", "ray"],
        capture_output=True, text=True, timeout=500, cwd=ROOT, env=RAY_ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = {line.split()[0]: line.split() for line in r.stdout.splitlines() if ":coco_64" in line}
    assert set(table) == {"seed0:coco_64", "seed1:coco_64", "ensemble:coco_64"}

    runs = [exp / "runs" / f"seed{s}" for s in (0, 1)]
    singles = [np.load(run / "eval" / "sims.npy") for run in runs]
    assert not np.array_equal(singles[0], singles[1])  # two different models
    mean = np.load(exp / "ensemble" / "sims.npy")
    assert mean.shape == (64, 320)
    np.testing.assert_allclose(mean, (singles[0].astype(np.float64) + singles[1]) / 2, atol=1e-7)

    summary = json.loads((exp / "ensemble.json").read_text())
    for name, sims in (("seed0", singles[0]), ("seed1", singles[1]), ("ensemble", mean)):
        rsum = summary["metrics"][f"{name}:coco_64"]["rsum"]
        assert rsum == pytest.approx(naive_rsum(sims), abs=1e-6)
        printed = float(table[f"{name}:coco_64"][-1])  # to 0.1: off by 0.05 at most
        assert printed == pytest.approx(rsum, abs=0.05 + 1e-9)
    for s, run in enumerate(runs):
        cfg = (run / "config.yaml").read_text()
        assert f"seed: {s}" in cfg
        assert sum(x["event"] == "start" for x in launches(run)) == 1

    # The local backend on the same storage: both runs are finished, it only re-evaluates.
    local = subprocess.run(
        [*command, "--backend", "local"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=RAY_ENV,
    )  # fmt: skip
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    for run in runs:
        assert (
            "training from step 16 (epoch 2, batch 0) to step 16" in (run / "train.log").read_text()
        )
    np.testing.assert_array_equal(np.load(exp / "ensemble" / "sims.npy"), mean)

    pgids = [x["pgid"] for run in runs for x in launches(run) if x["event"] == "start"]
    assert wait_groups_gone(pgids) == []
    assert processes_mentioning(str(exp)) == []


@pytest.mark.parametrize(
    "bad", [["--max-failures", "-1"], ["--nproc", "0"], ["--gpus-per-run", "-2"]]
)
def test_bad_counts_fail_before_anything_starts(bad: list[str], tmp_path: Path) -> None:
    r = subprocess.run(
        [*ENSEMBLE, "configs/demo.yaml", "--seeds", "0,1", "--test-data", "x-*.tar",
         "--protocol", "coco", "--storage", str(tmp_path / "e"), *bad],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=RAY_ENV,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and bad[0] in r.stderr, r.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("pattern", ["nothing-*.tar", "test-{000000..000001}.tar"])
def test_test_data_matching_nothing_fails_before_any_training(pattern: str, tmp_path: Path) -> None:
    """A --test-data glob matching nothing, or a brace list naming missing shards, ends the
    launcher with one line naming the pattern (exit 2) before any seed trains."""
    test_data = str(tmp_path / pattern)
    r = subprocess.run(
        [*ENSEMBLE, "configs/demo.yaml", "--seeds", "0,1", "--test-data", test_data,
         "--protocol", "coco", "--storage", str(tmp_path / "e")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=RAY_ENV,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"cluster/ensemble.py: error: --test-data {test_data!r}: ")
    assert not (tmp_path / "e").exists()  # no run directory: nothing trained
