"""Training through DeepSpeed on CPU: global-batch equivalence, exact resume after SIGKILL,
ZeRO-2 bf16 on 2 processes, ZeRO-3 export + eval, non-finite losses, early errors.

Every test here spawns processes with a free port and runs under a timeout, so a deadlock
fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_helpers import last_step, losses

from setdiv import cli
from setdiv.data.convert import synthetic_samples
from setdiv.data.shards import write_shards
from setdiv.data.vocab import Vocab

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(600)]

DETERMINISTIC = [
    # No randomness that depends on how the batch is split: no dropout anywhere, no sample
    # shuffle buffer (shards are still shuffled by (seed, epoch)).
    "model.image.dropout=0.0",
    "model.text.dropout=0.0",
    "data.region_dropout=0.0",
    "data.word_dropout=0.0",
    "data.shuffle_buffer=1",
    "train.precision=fp32",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_shards(synthetic_samples("train", 256, 0), root, "train", "regions", "synthetic", 64)
    write_shards(synthetic_samples("val", 64, 0), root, "val", "regions", "synthetic", 32)
    Vocab.build(c for s in synthetic_samples("train", 256, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    return root


def base_args(data: Path, *extra: str) -> list[str]:
    return [
        str(ROOT / "configs/demo.yaml"),
        f"model.text.vocab_path={data / 'vocab.json'}",
        "model.text.vocab_size=null",
        f"data.train_shards={data}/train-*.tar",
        *extra,
    ]


JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
"""Children start as fresh single-node jobs, whatever this test process has in its env."""


def setdiv(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "setdiv.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=CLEAN_ENV,
    )


def test_two_ranks_batch_b_equal_one_rank_batch_2b(data: Path, tmp_path: Path) -> None:
    common = [*DETERMINISTIC, "train.epochs=1", "train.ckpt_every=1000"]
    one = setdiv(
        "train",
        *base_args(data, *common, "data.batch_size=32", "data.num_workers=2"),
        "--run-dir",
        str(tmp_path / "one"),
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = setdiv(
        "train",
        *base_args(data, *common, "data.batch_size=32", "data.num_workers=1"),
        "--run-dir",
        str(tmp_path / "two"),
        "--nproc",
        "2",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 8
    for step in range(1, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert a[5] < a[1]


def test_sigkill_mid_epoch_and_resume_reproduces_the_run(data: Path, tmp_path: Path) -> None:
    args = base_args(
        data,
        *DETERMINISTIC,
        "data.shuffle_buffer=16",
        "model.image.dropout=0.1",
        "train.epochs=2",
        "train.ckpt_every=3",
        "data.batch_size=32",
        "data.num_workers=2",
    )
    ref = setdiv("train", *args, "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "setdiv.cli", "train", *args, "--run-dir", str(run)],
        cwd=ROOT,
        env=CLEAN_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and last_step(run) < 11:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run))
    assert 4 <= killed_at < 16, f"killed at step {killed_at}: not mid-run"
    resumed = setdiv("train", *args, "--run-dir", str(run), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stderr
    a, b = losses(tmp_path / "ref"), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]  # step for step, exactly


def test_resume_over_corrupt_samples_reproduces_the_run(data: Path, tmp_path: Path) -> None:
    """Corrupt samples before a mid-epoch checkpoint of a 2-rank run: resuming from it
    reproduces the uninterrupted run step for step, into the next epoch (each rank's reader
    resumes at the data position the checkpoint saved for it, not at batches x batch size;
    without that the first resumed loss already differs)."""
    from test_data import rewrite_member

    shards = tmp_path / "shards"
    shards.mkdir()
    for f in data.glob("train-*"):
        shutil.copy(f, shards)
    for i in range(4):  # 64 samples per shard
        for j in (5, 20, 40):
            name = f"train{64 * i + j:07d}.npy"
            rewrite_member(shards / f"train-{i:06d}.tar", name, b"not an npy file")
    args = [
        *base_args(data, *DETERMINISTIC, "data.shuffle_buffer=16", "train.epochs=2"),
        f"data.train_shards={shards}/train-*.tar",
        *("data.verify_checksums=false", "train.ckpt_every=3", "train.keep_last=10"),
        *("data.batch_size=32", "data.num_workers=1", "--nproc", "2"),
    ]
    ref = setdiv("train", *args, "--run-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    a = losses(tmp_path / "ref")
    assert sorted(a) == list(range(1, 17))
    skipped = [json.loads(x) for x in (tmp_path / "ref/metrics.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_samples", 0) for r in skipped) >= 12
    ckpt = tmp_path / "ref/checkpoints/step00000006"
    resumed = setdiv("train", *args, "--run-dir", str(tmp_path / "resumed"), "--resume", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = losses(tmp_path / "resumed")
    assert sorted(b) == list(range(7, 17))
    assert [b[s] for s in sorted(b)] == [a[s] for s in range(7, 17)]


def test_zero2_bf16_weights_two_processes_train(data: Path, tmp_path: Path) -> None:
    r = setdiv(
        "train",
        *base_args(
            data,
            "train.zero_stage=2",
            "train.precision=bf16",
            "train.half_weights=true",  # bf16 parameters (autocast: tests/test_recipe.py)
            "train.epochs=2",
            "loss.mean_negative_epochs=0",  # one objective, so early and late losses compare
            "data.batch_size=32",
            "data.num_workers=1",
            "train.log_every=1",
        ),
        "--run-dir",
        str(tmp_path / "z2"),
        "--nproc",
        "2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = losses(tmp_path / "z2")
    assert len(a) == 16 and all(np.isfinite(v) for v in a.values())
    assert np.mean([a[s] for s in range(13, 17)]) < np.mean([a[s] for s in range(1, 5)])
    logged = [json.loads(x) for x in (tmp_path / "z2/metrics.jsonl").read_text().splitlines()]
    spread = [r["sim_std"] for r in logged if "sim_std" in r]  # learning, not collapsing
    assert np.mean(spread[-4:]) > np.mean(spread[:4]), spread
    ckpt = tmp_path / "z2/checkpoints" / (tmp_path / "z2/checkpoints/latest").read_text()
    assert len(list(ckpt.glob("*zero_pp_rank_*optim_states.pt"))) == 2  # one partition per rank


def test_zero3_checkpoint_exports_and_evaluates(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "z3"
    r = setdiv(
        "train",
        *base_args(
            data,
            "train.zero_stage=3",
            "train.epochs=1",
            "data.batch_size=32",
            "data.num_workers=1",
            f"data.val_shards={data}/val-*.tar",
            "data.eval_batch_size=16",
        ),
        "--run-dir",
        str(run),
        "--nproc",
        "2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert cli.main(["export", str(run)]) == 0
    from safetensors.torch import load_file

    weights = load_file(str(run / "export/model.safetensors"))
    assert all(v.dtype.is_floating_point and v.numel() > 0 for v in weights.values())
    assert cli.main(["eval", str(run), "--data", f"{data}/val-*.tar", "--protocol", "coco"]) == 0
    metrics = json.loads((run / "eval/metrics.json").read_text())
    val = [
        json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_rsum" in x
    ]
    # The exported fp32 weights reproduce the live engine's validation RSUM.
    assert metrics["coco_64"]["rsum"] == pytest.approx(val[-1]["val_rsum"], abs=1e-6)


def test_nonfinite_losses_are_skipped_then_stop(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "nan"
    code = (
        "import sys, math, torch\n"
        "from setdiv.train import launch, trainer\n"
        "orig = trainer.build_loss\n"
        "def nan_loss(cfg, sim):\n"
        "    fn = orig(cfg, sim)\n"
        "    calls, forward = [0], fn.forward\n"
        "    def f(img, txt, **kw):\n"
        "        calls[0] += 1\n"
        "        t = forward(img, txt, **kw)\n"
        "        if calls[0] == 2 or calls[0] >= 5:\n"
        "            t['i2t_loss'] = t['i2t_loss'] * float('nan')\n"
        "        return t\n"
        "    fn.forward = f  # the real loss module, its forward wrapped\n"
        "    return fn\n"
        "trainer.build_loss = nan_loss\n"
        "from setdiv import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    args = base_args(
        data,
        *DETERMINISTIC,
        "train.epochs=2",
        "train.ckpt_every=3",
        "train.max_nonfinite=3",
        "data.batch_size=32",
        "data.num_workers=1",
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "train", *args, "--run-dir", str(run)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env=CLEAN_ENV,
    )
    assert r.returncode == 3  # divergence, told apart from user errors (2) and crashes
    assert "3 consecutive non-finite losses at step 7" in r.stderr
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 3, 4]  # step 2 skipped, 5.. skipped
    assert recs[-1]["nonfinite_steps"] == 1
    # No checkpoint during the streak (steps 5-7): the step-6 one is not written, and the stop
    # message names the step-3 checkpoint, which is.
    assert (run / "checkpoints/latest").read_text() == "step00000003"
    assert not (run / "checkpoints/step00000006").exists()
    assert f"last finite checkpoint: {run}/checkpoints/step00000003" in r.stderr


def test_nonfinite_buffers_are_never_checkpointed(data: Path, tmp_path: Path) -> None:
    """A NaN in a BatchNorm running statistic leaves the training loss finite (batch
    statistics), but would poison every evaluation: the next checkpoint is refused and the run
    stops (exit 3) naming the buffer and the last finite checkpoint."""
    run = tmp_path / "nanbuf"
    code = (
        "import sys, torch\n"
        "from setdiv.train import trainer\n"
        "orig = trainer.Trainer.train_step\n"
        "def step(self, batch):\n"
        "    out = orig(self, batch)\n"
        "    if self.state.step == 2:  # the third step: after the step-2 checkpoint\n"
        "        self.engine.module.image_encoder.head.bn.running_var.fill_(float('nan'))\n"
        "    return out\n"
        "trainer.Trainer.train_step = step\n"
        "from setdiv import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    args = base_args(
        data, *DETERMINISTIC, "train.epochs=1", "train.ckpt_every=2", "data.batch_size=32",
        "data.num_workers=1", f"data.val_shards={data}/val-*.tar", "data.eval_batch_size=32",
    )  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-c", code, "train", *args, "--run-dir", str(run)],
        capture_output=True, text=True, timeout=400, cwd=ROOT, env=CLEAN_ENV,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]
    assert "step 4: the model holds non-finite values (image_encoder.head.bn.running_var)" in (
        r.stderr
    )
    assert f"last finite checkpoint: {run}/checkpoints/step00000002" in r.stderr
    assert (run / "checkpoints/latest").read_text() == "step00000002"
    assert not (run / "checkpoints/step00000004").exists()
    assert not (run / "checkpoints/best").exists()


def test_clear_errors_before_any_work(data: Path, tmp_path: Path) -> None:
    r = setdiv("train", *base_args(data, "train.nope=1"), "--run-dir", str(tmp_path / "a"))
    assert r.returncode == 2 and "train.nope" in r.stderr
    r = setdiv(
        "train",
        *base_args(data, "data.num_workers=2"),
        "--run-dir",
        str(tmp_path / "b"),
        "--nproc",
        "4",
    )
    assert r.returncode != 0 and "4 shards for 4 ranks x 2 workers" in r.stderr
    r = setdiv(
        "train",
        *base_args(data, f"model.text.glove_path={tmp_path / 'glove.txt'}"),
        "--run-dir",
        str(tmp_path / "c"),
    )
    assert r.returncode == 2 and "config key 'model.text.glove_path'" in r.stderr
    r = setdiv(
        "train",
        *base_args(data, "model.text.name=bert", f"model.text.bert_path={tmp_path}/bert"),
        "--run-dir",
        str(tmp_path / "c"),
    )
    assert r.returncode == 2 and "config key 'model.text.bert_path'" in r.stderr
    assert not (tmp_path / "c/checkpoints").exists()


def test_resume_with_nothing_starts_fresh(data: Path, tmp_path: Path) -> None:
    # What an attempt that crashed before its first checkpoint leaves behind: its records go.
    (tmp_path / "fresh").mkdir()
    stale = [{"step": s, "epoch": 0, "loss": 9.0} for s in (1, 2, 3)]
    (tmp_path / "fresh/metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stale))
    config, *overrides = base_args(
        data, "train.epochs=1", "data.batch_size=64", "data.num_workers=1", "train.log_every=1"
    )
    # Options and dotted overrides intermixed, as users type them.
    r = setdiv(
        "train",
        config,
        "--run-dir",
        str(tmp_path / "fresh"),
        "model.embed_dim=32",
        "--resume",
        "latest",
        *overrides,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no checkpoint" in r.stderr and "starting fresh" in r.stderr
    assert "embed_dim: 32" in (tmp_path / "fresh/config.yaml").read_text()
    assert (tmp_path / "fresh/checkpoints/latest").read_text() == "step00000004"
    records = [json.loads(x) for x in (tmp_path / "fresh/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3, 4]  # no stale record kept


def test_nonfinite_validation_scores_are_nan_never_best(data: Path, tmp_path: Path) -> None:
    """Validation of a model whose scores are not finite records val_rsum NaN (whatever the
    metrics would make of such a matrix) and never writes the `best` checkpoint."""
    run = tmp_path / "nanval"
    code = (
        "import sys, numpy as np\n"
        "from setdiv.train import trainer\n"
        "orig = trainer.gather_and_score\n"
        "def nan_scores(*args, **kwargs):\n"
        "    result = orig(*args, **kwargs)\n"
        "    if result is not None:\n"
        "        result.sims[:, ::7] = np.nan\n"
        "    return result\n"
        "trainer.gather_and_score = nan_scores\n"
        "from setdiv import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    args = base_args(
        data,
        "train.epochs=1",
        "data.batch_size=64",
        "data.num_workers=1",
        f"data.val_shards={data}/val-*.tar",
        "data.eval_batch_size=32",
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "train", *args, "--run-dir", str(run)],
        capture_output=True, text=True, timeout=400, cwd=ROOT, env=CLEAN_ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "scores are not finite; val_rsum recorded as NaN" in r.stderr
    val = [
        json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_rsum" in x
    ]
    assert len(val) == 1 and np.isnan(val[0]["val_rsum"])
    assert not (run / "checkpoints" / "best").exists()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tree_digest(run: Path) -> dict[str, bytes]:
    """Every file of a run directory but the lock, with its bytes."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != "train.lock"
    }


def test_run_dir_is_owned_and_a_killed_launcher_leaves_no_orphans(
    data: Path, tmp_path: Path
) -> None:
    """Two ranks with a data worker each: while they train, a second training into the same
    directory is refused, naming the owner. `kill -9` of the launcher alone takes every rank
    and worker with it. Afterwards the run is protected: no training without --resume, and a
    --resume with another config fails leaving every file of the run byte-identical (the stale
    lock of the killed run does not stand in the way). Both refusals come from a rank of a
    2-process job, as one line and exit code 2."""
    run = tmp_path / "owned"
    args = base_args(
        data, "train.epochs=50", "train.ckpt_every=4", "data.batch_size=32", "data.num_workers=1"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "setdiv.cli", "train", *args, "--run-dir", str(run),
         "--nproc", "2"],
        cwd=ROOT, env=CLEAN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and last_step(run) < 3:
            time.sleep(0.1)
        assert proc.poll() is None and last_step(run) >= 3
        tree = descendants(proc.pid)
        owner = json.loads((run / "train.lock").read_text())
        assert owner["pid"] in tree  # rank 0 owns the run
        assert len(tree) >= 4  # two ranks, a data worker each
        second = setdiv("train", *args, "--run-dir", str(run), "--resume", "latest",
                        "--nproc", "2")  # fmt: skip
        assert second.returncode == 2
        assert f"is being trained by pid {owner['pid']} on host" in second.stderr
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only
        proc.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(running(p) for p in tree):
            time.sleep(0.2)
        assert not [p for p in tree if running(p)], "orphans survived the launcher"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    before = tree_digest(run)
    assert "checkpoints/latest" in before and "config.yaml" in before
    for extra, expected in [
        ([], "already holds a run: pass --resume latest"),
        (["--resume", "latest", "model.embed_dim=32"], "model.embed_dim: 64 -> 32"),
    ]:
        r = setdiv("train", *args, "--run-dir", str(run), "--nproc", "2", *extra)
        assert r.returncode == 2 and expected in r.stderr, r.stderr[-3000:]
        errors = [x for x in r.stderr.splitlines() if "error" in x.lower()]
        assert errors == [next(x for x in errors if x.startswith("setdiv train: error:"))]
        assert "Traceback" not in r.stderr
        assert tree_digest(run) == before
