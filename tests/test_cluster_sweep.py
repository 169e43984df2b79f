"""cluster/sweep.py: the --space grammar, and a 4-trial Ray Tune sweep on synthetic data with
one trial crashed once (retried, resuming its run), two diverging trials (failed, never best),
an interrupt and a resume by re-running the same command; CSV, best YAML, no stray process."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import (
    RAY_ENV,
    ROOT,
    launches,
    processes_mentioning,
    tiny_overrides,
    wait_for,
    wait_groups_gone,
    write_data,
)

from setdiv import config as config_lib
from setdiv_cluster.sweep import parse_space

SWEEP = [sys.executable, str(ROOT / "cluster" / "sweep.py")]


def test_space_grammar() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    dim = parse_space("model.image_set.num_embeds=1,2,4,8")
    domain = dim.domain()
    assert isinstance(domain, Categorical) and domain.categories == [1, 2, 4, 8]
    assert set(domain.sample(size=200)) == {1, 2, 4, 8}  # a choice, exactly those values
    assert parse_space("loss.reduction=mean,sum").values == ["mean", "sum"]
    assert parse_space("optim.lr=1e-3,2e-3").values == [1e-3, 2e-3]
    assert parse_space("optim.lr=grid:1e-3,2e-3").domain() == {"grid_search": [1e-3, 2e-3]}
    ints = parse_space("model.image_set.num_iters=int:1:6").domain()
    assert isinstance(ints, Integer) and set(ints.sample(size=400)) == {1, 2, 3, 4, 5, 6}
    alpha = parse_space("similarity.alpha=log:4:64").domain()
    samples = alpha.sample(size=400)
    assert isinstance(alpha, Float) and 4 <= min(samples) and max(samples) <= 64
    assert sum(s < 16 for s in samples) == pytest.approx(200, abs=50)  # log-uniform: median 16
    for bad in ("nokey", "x=int:3", "x=int:5:1", "x=log:0:4", "=1,2"):
        with pytest.raises(ValueError, match="--space"):
            parse_space(bad)


def test_bad_space_fails_before_ray_starts(tmp_path: Path) -> None:
    data = write_data(tmp_path / "d", train=64, val=32)
    base = [*SWEEP, "configs/demo.yaml", *tiny_overrides(data, 1, val=True)]
    r = subprocess.run(
        [*base, "--space", "model.image_set.nope=1,2", "--storage", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=RAY_ENV,
    )  # fmt: skip
    assert r.returncode == 2 and "model.image_set.nope" in r.stderr
    r = subprocess.run(
        [*SWEEP, "configs/demo.yaml", "--space", "optim.lr=1e-3,2e-3"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=RAY_ENV,
    )  # fmt: skip
    assert r.returncode == 2 and "data.val_shards" in r.stderr
    for bad in (
        ["--reduction-factor", "1"],
        ["--grace-epochs", "0"],
        ["--grace-epochs", "2"],  # more than train.epochs (1)
        ["--max-failures", "-1"],
        ["--samples", "0"],
        ["--gpus-per-trial", "-1"],
    ):
        r = subprocess.run(
            [*base, "--space", "optim.lr=1e-3,2e-3", *bad, "--storage", str(tmp_path / "s")],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=RAY_ENV,
        )  # fmt: skip
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and bad[0] in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "Ray" not in r.stderr
    assert not (tmp_path / "s").exists()


def trial_runs(exp: Path) -> dict[str, dict]:
    out = {}
    for f in (exp / "runs").glob("*/trial.json"):
        out[f.parent.name] = json.loads(f.read_text())["values"]
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sweep_retries_a_crash_fails_divergence_and_resumes(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", train=256, val=32)
    exp = tmp_path / "sweeps" / "t"
    fixed = tiny_overrides(data, epochs=4, val=True)
    command = [
        *SWEEP, "configs/demo.yaml", *fixed,
        "--space", "optim.lr=grid:2e-3,1e30",  # 1e30: every second trial diverges
        "--space", "model.image_set.num_embeds=1,2,4",
        "--tie", "model.text_set.num_embeds=model.image_set.num_embeds",
        "--samples", "2", "--max-failures", "2", "--num-cpus", "2", "--num-gpus", "0",
        "--storage", str(tmp_path / "sweeps"), "--name", "t",
    ]  # fmt: skip
    first_log = open(tmp_path / "first.log", "w")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen(
        command, stdout=first_log, stderr=subprocess.STDOUT, cwd=ROOT, env=RAY_ENV,
        start_new_session=True,
    )  # fmt: skip
    try:
        # 1. Crash one healthy trial once, after its first validation: SIGKILL its training.
        def healthy_with_checkpoint() -> str | None:
            for name, values in trial_runs(exp).items():
                run = exp / "runs" / name
                if values["optim.lr"] == 2e-3 and (run / "checkpoints" / "latest").is_file():
                    return name
            return None

        victim = exp / "runs" / wait_for("an epoch-end checkpoint", healthy_with_checkpoint)
        os.killpg(launches(victim)[0]["pgid"], signal.SIGKILL)
        # 2. Ray retries it; once it trains again, interrupt the whole sweep.
        wait_for("the retry", lambda: sum(x["event"] == "start" for x in launches(victim)) >= 2)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        first_log.close()
    first = (tmp_path / "first.log").read_text()
    assert "re-run the same command to resume" in first, first[-3000:]
    before = {name: launches(exp / "runs" / name) for name in trial_runs(exp)}
    ended = {
        n
        for n, ls in before.items()
        if ls and ls[-1]["event"] == "end" and ls[-1]["exit"] in (0, 3)
    }

    # 3. The same command again resumes the sweep instead of starting over.
    again = subprocess.run(
        command, capture_output=True, text=True, timeout=400, cwd=ROOT, env=RAY_ENV
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming the sweep in {exp}" in again.stdout
    runs = trial_runs(exp)
    assert len(runs) == 4 and set(before) <= set(runs)  # the same trials, none added
    for name in ended:  # trials that had ended were not started again
        assert sum(x["event"] == "start" for x in launches(exp / "runs" / name)) == sum(
            x["event"] == "start" for x in before[name]
        )
    victim_log = (victim / "train.log").read_text()
    assert "resumed at epoch" in victim_log  # the retry continued the run, not a new one
    records = [json.loads(x) for x in (victim / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, len(train_steps) + 1))  # no step lost or repeated

    # 4. The table, the CSV and the best configuration.
    rows = list(csv.DictReader(open(exp / "results.csv")))  # noqa: SIM115
    assert len(rows) == 4
    by_lr = {float(r["optim.lr"]): [] for r in rows}
    for r in rows:
        by_lr[float(r["optim.lr"])].append(r)
    assert [r["status"] for r in by_lr[1e30]] == ["non-finite", "non-finite"]
    assert {r["status"] for r in by_lr[2e-3]} <= {"completed", "stopped early"}
    assert all(r["model.text_set.num_embeds"] == r["model.image_set.num_embeds"] for r in rows)
    best = max(by_lr[2e-3], key=lambda r: float(r["best_val_rsum"]))
    assert math.isfinite(float(best["best_val_rsum"]))
    delta = config_lib.load([exp / "best.yaml"])
    k = int(best["model.image_set.num_embeds"])
    expected = config_lib.load(
        ["configs/demo.yaml"],
        [
            *fixed,
            "optim.lr=0.002",
            f"model.image_set.num_embeds={k}",
            f"model.text_set.num_embeds={k}",
        ],
    )
    assert delta == expected
    assert f"best: trial {best['trial_id']}" in again.stdout

    # 5. Nothing left running: every training's process group is gone.
    pgids = [
        x["pgid"] for name in runs for x in launches(exp / "runs" / name) if x["event"] == "start"
    ]
    assert wait_groups_gone(pgids) == []
    assert processes_mentioning(str(exp)) == []


def test_nonfinite_validation_fails_the_trial_and_never_wins(tmp_path: Path) -> None:
    """A run whose validation is NaN (as a diverged model's metrics may report it, even as
    RSUM 600) is failed by the trial before anything reaches Tune, and is never the best."""
    from types import SimpleNamespace

    from setdiv_cluster.sweep import _row, best_row
    from setdiv_cluster.trials import NONFINITE_MARK, NonFiniteTrialError, _Reporter

    runs = tmp_path / "runs"
    for name, scores in (("good", [100.0, 120.0]), ("nan", [150.0, float("nan")])):
        (runs / name).mkdir(parents=True)
        lines = [
            json.dumps({"step": 8 * (e + 1), "epoch": e + 1, "val_rsum": v})
            for e, v in enumerate(scores)
        ]
        (runs / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    reporter = _Reporter(runs / "nan", reported=1, last_epoch=2)
    with pytest.raises(NonFiniteTrialError, match="val_rsum nan at epoch 2"):
        reporter.poll(ended=True)  # epoch 1 already reported: only epoch 2 is read
    assert (runs / "nan" / NONFINITE_MARK).is_file()

    def trial(name: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id=name, config={"optim.lr": 1e-3}, status="TERMINATED")

    rows = [_row(trial(n), runs, (), epochs=2) for n in ("good", "nan")]
    assert [(r.status, r.best, r.epochs) for r in rows] == [
        ("completed", 120.0, 2),
        ("non-finite", 150.0, 2),
    ]
    assert best_row(rows).trial_id == "good"  # 150 was a diverged run's: not eligible


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_a_trial_refused_by_setdiv_train_is_not_retried(tmp_path: Path) -> None:
    """Exit code 2 (here: a vocabulary file that does not exist) fails the same way every
    time: the trial runs once, whatever --max-failures says, the other trial completes, and
    the sweep reports it and exits 2."""
    data = write_data(tmp_path / "data", train=64, val=32)
    exp = tmp_path / "sweeps" / "u"
    r = subprocess.run(
        [
            *SWEEP, "configs/demo.yaml", *tiny_overrides(data, 1, val=True),
            "--space", f"model.text.vocab_path=grid:{data}/vocab.json,{data}/missing.json",
            "--scheduler", "fifo", "--samples", "1", "--max-failures", "3",
            "--num-cpus", "2", "--num-gpus", "0", "--storage", str(tmp_path / "sweeps"),
            "--name", "u",
        ],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=RAY_ENV,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "refused by setdiv train (not retried)" in r.stderr and "missing.json" in r.stderr
    with open(exp / "results.csv") as f:
        rows = {Path(x["model.text.vocab_path"]).name: x for x in csv.DictReader(f)}
    assert rows["vocab.json"]["status"] == "completed"
    assert rows["missing.json"]["status"] == "user error"
    refused = exp / "runs" / rows["missing.json"]["trial_id"]
    assert sum(x["event"] == "start" for x in launches(refused)) == 1  # run once, not retried
