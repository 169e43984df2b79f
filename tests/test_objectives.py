"""The objective in training (docs/objectives.md): the collapse guard decides as specified on
hand-made spread sequences; a run made to collapse recovers or stops with exit 3; InfoNCE's
learned temperature is logged, checkpointed, exported and resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import CLEAN_ENV, ROOT, last_step, run_setdiv, write_data
from safetensors import safe_open

from setdiv.config import CollapseConfig
from setdiv.train.watch import CollapseError, CollapseGuard

# --- the guard on hand-made spreads -------------------------------------------------------------


def feed(guard: CollapseGuard, spreads: list[float], can_fall_back: bool = True) -> list:
    return [guard.update(s, can_fall_back, step) for step, s in enumerate(spreads)]


def test_guard_falls_back_on_a_collapse_and_returns_when_the_spread_does() -> None:
    guard = CollapseGuard(CollapseConfig(window=3, ratio=0.2, recover_ratio=0.5, patience=50))
    events = feed(guard, [0.04, 0.05, 0.06, 0.05, 0.05])  # healthy: windows of about 0.05
    assert events == [None] * 5 and not guard.fallback and guard.best == pytest.approx(0.16 / 3)
    events = feed(guard, [0.001, 0.001, 0.001])  # window means 0.034, 0.017, 0.001: collapsed
    assert events == [None, None, "collapsed"] and guard.fallback
    events = feed(guard, [0.01, 0.02, 0.03, 0.04])  # a fresh window under the fallback
    assert events == [None, None, None, "recovered"] and guard.fallback  # (for good)
    assert guard.collapsed_steps == 5  # the step that found it + 4 under the fallback


def test_guard_state_round_trips_and_decides_alike() -> None:
    cfg = CollapseConfig(window=4, patience=100)
    spreads = [0.05, 0.04, 0.06, 0.05, 0.002, 0.001, 0.001, 0.001, 0.002, 0.003, 0.03, 0.05, 0.05]
    whole = CollapseGuard(cfg)
    expected = feed(whole, spreads)
    first, second = CollapseGuard(cfg), CollapseGuard(cfg)
    got = feed(first, spreads[:7])
    second.load(json.loads(json.dumps(first.state())))  # as a checkpoint carries it
    got += [second.update(s, True, 7 + i) for i, s in enumerate(spreads[7:])]
    assert got == expected and "collapsed" in got and "recovered" in got
    assert second.state() == whole.state()


def test_guard_stops_where_it_cannot_recover() -> None:
    collapse = [0.05] * 3 + [0.001] * 3
    with pytest.raises(CollapseError, match="already trains against all negatives") as err:
        feed(CollapseGuard(CollapseConfig(window=3)), collapse, can_fall_back=False)
    assert err.value.exit_code == 3 and "loss.negatives=selective" in str(err.value)
    with pytest.raises(CollapseError, match="action=stop"):
        feed(CollapseGuard(CollapseConfig(window=3, action="stop")), collapse)
    patient = CollapseGuard(CollapseConfig(window=3, patience=5))
    with pytest.raises(CollapseError, match="after 5 steps"):  # the fallback does not help
        feed(patient, collapse + [0.001] * 10)
    warn = CollapseGuard(CollapseConfig(window=3, action="warn", patience=2))
    assert "collapsed" in feed(warn, collapse + [0.001] * 10) and not warn.fallback
    warn.finish(16)  # warn: a collapsed run may end
    ended = CollapseGuard(CollapseConfig(window=3))
    feed(ended, collapse + [0.002] * 3)  # falls back, but the run ends before it recovers
    with pytest.raises(CollapseError, match="the run ended collapsed"):
        ended.finish(9)
    again = CollapseGuard(CollapseConfig(window=3))
    events = feed(again, collapse + [0.04] * 3 + [0.001] * 2)  # recovers on all negatives
    assert events[-3:] == ["recovered", None, None] and again.fallback
    again.finish(11)  # recovered: fine
    with pytest.raises(CollapseError, match="already trains against all negatives"):
        feed(again, [0.0001] * 3)  # a second collapse, on all negatives: nothing left to try


def test_guard_is_quiet_on_a_healthy_run_whose_spread_shrinks_slowly() -> None:
    guard = CollapseGuard(CollapseConfig(window=5))
    spreads = [0.045 * (1 - 0.5 * i / 200) for i in range(200)]  # halves over the run
    assert set(feed(guard, spreads)) == {None}


def test_guard_catches_a_collapse_from_the_first_steps_by_the_margin() -> None:
    """The learning benchmark's hardest negatives from step 0 under dropouts: the spread only
    ever falls (0.045 -> 0.008, a quarter of the first window's: above `ratio`) while both
    triplet terms sit above the margin. The spread alone misses it; with the terms at the
    margin the guard falls back once the spread is below `recover_ratio` of the highest."""
    spreads = [max(0.045 * 0.97**i, 0.008) for i in range(120)]
    alone = CollapseGuard(CollapseConfig(window=20))
    assert set(feed(alone, spreads)) == {None}
    guard = CollapseGuard(CollapseConfig(window=20))
    events = [guard.update(s, True, i, margin_share=1.08) for i, s in enumerate(spreads)]
    first = events.index("collapsed")
    window = [sum(spreads[i - 19 : i + 1]) / 20 for i in range(19, len(spreads))]
    expected = next(i + 19 for i, m in enumerate(window) if m < 0.5 * max(window[: i + 1]))
    assert first == expected and guard.fallback
    # against all negatives already (mean negatives, a warm-up): the margin sign does not count
    warm = CollapseGuard(CollapseConfig(window=20))
    assert {warm.update(s, False, i, margin_share=1.08) for i, s in enumerate(spreads)} == {None}
    # positives that beat their negatives (terms below the margin): a shrinking spread is fine
    healthy = CollapseGuard(CollapseConfig(window=20))
    assert {healthy.update(s, True, i, margin_share=0.6) for i, s in enumerate(spreads)} == {None}
    # a window with a non-triplet step (None) does not count as at the margin
    mixed = CollapseGuard(CollapseConfig(window=20))
    shares = [None if i % 7 == 0 else 1.08 for i in range(120)]
    assert {
        mixed.update(s, True, i, margin_share=g)
        for i, (s, g) in enumerate(zip(spreads, shares, strict=True))
    } == {None}


# --- training runs --------------------------------------------------------------------------

TINY = [
    "train.precision=fp32",
    "train.log_every=1",
    "data.num_workers=1",
    "data.shuffle_buffer=16",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("objectives"), train=256, val=64)


def overrides(data: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "configs/demo.yaml"),
        f"model.text.vocab_path={data / 'vocab.json'}",
        "model.text.vocab_size=null",
        f"data.train_shards={data}/train-*.tar",
        "data.batch_size=32",
        *TINY,
        *extra,
    ]


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def test_infonce_temperature_is_learned_logged_exported_and_resumed_exactly(
    data: Path, tmp_path: Path
) -> None:
    args = overrides(
        data, "loss.name=infonce", "loss.mean_negative_epochs=0", "model.image.dropout=0.1",
        "train.epochs=2", "train.ckpt_every=3",
    )  # fmt: skip
    ref = run_setdiv("train", *args, "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "objective: symmetric InfoNCE, temperature 0.07 (learned" in ref.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "setdiv.cli", "train", *args, "--run-dir", str(run)],
        cwd=ROOT, env=CLEAN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and last_step(run) < 10:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= last_step(run) < 16, "killed mid-run"
    resumed = run_setdiv("train", *args, "--run-dir", str(run), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = {r["step"]: r for r in records(tmp_path / "ref") if "temperature" in r}
    b = {r["step"]: r for r in records(run) if "temperature" in r}
    assert sorted(a) == sorted(b) == list(range(1, 17))
    temps = [a[s]["temperature"] for s in sorted(a)]
    assert temps[0] == pytest.approx(0.07, rel=1e-3) and abs(temps[-1] - 0.07) > 1e-4  # learned
    assert [b[s]["temperature"] for s in sorted(b)] == temps  # step for step, exactly
    assert [b[s]["loss"] for s in sorted(b)] == [a[s]["loss"] for s in sorted(a)]
    assert run_setdiv("export", str(run)).returncode == 0
    with safe_open(str(run / "export/model.safetensors"), "pt") as f:
        assert not any(k.startswith("objective.") for k in f.keys())  # noqa: SIM118 (not a dict)
        # the state after the last step, one optimizer step past the last logged forward
        assert float(f.metadata()["temperature"]) == pytest.approx(temps[-1], rel=0.05)


@pytest.fixture(scope="module")
def data512(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 training images: 16 steps an epoch at batch 32."""
    return write_data(tmp_path_factory.mktemp("collapse"), train=512, val=64)


MADE_TO_COLLAPSE = [
    "loss.negatives=hardest",  # the official objective ...
    "loss.mean_negative_epochs=0",  # ... from the first step: it collapses on this data
    "train.epochs=16",
    "train.collapse.window=10",
    "train.collapse.ratio=0.25",
]


def test_a_run_made_to_collapse_recovers_on_all_negatives(data512: Path, tmp_path: Path) -> None:
    run, data = tmp_path / "run", data512
    args = overrides(data, *MADE_TO_COLLAPSE, f"data.val_shards={data}/val-*.tar",
                     "data.eval_batch_size=32")  # fmt: skip
    done = run_setdiv("train", *args, "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(": collapse: the batch scores' spread") == 1
    assert done.stderr.count("recovered from the collapse") == 1
    steps = [r for r in records(run) if "sim_std" in r]
    fell_back = [r["step"] for r in steps if r["all_negatives"]]
    assert fell_back and fell_back == list(range(fell_back[0], 257))  # from then on, for good
    before = [r["sim_std"] for r in steps if r["step"] < fell_back[0]]
    after = [r["sim_std"] for r in steps[-16:]]  # the last epoch
    # it did collapse: the spread halved while the hinges sat at the margin (the guard's
    # margin sign; the spread alone finds it later, at a quarter)
    assert sum(before[-10:]) / 10 < 0.5 * max(before)
    at_collapse_terms = [r for r in steps if r["step"] < fell_back[0]][-10:]
    margin = 0.2  # configs/demo.yaml
    assert all(min(r["i2t_loss"], r["t2i_loss"]) >= 0.9 * margin for r in at_collapse_terms)
    assert sum(after) / 16 > 2 * max(before)  # and trains a spread-out model in the end
    val = [r["val_rsum"] for r in records(run) if "val_rsum" in r]
    at_collapse = val[fell_back[0] // 16 - 1]
    assert val[-1] > at_collapse + 50, val


def test_a_run_made_to_collapse_stops_with_exit_3_when_told_to(
    data512: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = overrides(data512, *MADE_TO_COLLAPSE, "train.collapse.action=stop")
    done = run_setdiv("train", *args, "--run-dir", str(run))
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [x for x in done.stderr.splitlines() if "training collapsed" in x]
    assert len(lines) == 1 and "loss.negatives=selective" in lines[0], done.stderr[-2000:]
    assert max(r["step"] for r in records(run) if "loss" in r) < 256  # stopped early


def test_the_temperature_trains_alike_under_zero_3_and_exports_from_its_partitions(
    data: Path, tmp_path: Path
) -> None:
    """ZeRO-3 partitions the temperature like any parameter: the trainer reads it inside the
    loss's forward (where the partition is whole), and export merges it back out."""
    runs = {}
    for stage in (0, 3):
        run = runs[stage] = tmp_path / f"zero{stage}"
        args = overrides(data, "loss.name=infonce", "train.epochs=1", f"train.zero_stage={stage}")
        done = run_setdiv("train", *args, "--run-dir", str(run))
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = ([r for r in records(runs[s]) if "temperature" in r] for s in (0, 3))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert y["temperature"] == pytest.approx(x["temperature"], rel=1e-5)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    assert run_setdiv("export", str(runs[3])).returncode == 0
    with safe_open(str(runs[3] / "export/model.safetensors"), "pt") as f:
        assert 0.05 < float(f.metadata()["temperature"]) < 0.09
