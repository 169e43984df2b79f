"""cluster/submit.py without a cluster: the sbatch script for 4 nodes x 8 GPUs, clear errors,
and a 2-task job on submitit's local executor that is preempted, requeues itself and resumes.
Submission to a real Slurm is tests/test_cluster_slurm.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import (
    CLEAN_ENV,
    ROOT,
    last_step,
    losses,
    processes_mentioning,
    tiny_overrides,
    write_data,
)

from setdiv import config as config_lib
from setdiv_cluster.jobs import TrainJob

SUBMIT = str(ROOT / "cluster" / "submit.py")


def submit(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SUBMIT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env or CLEAN_ENV,
    )


def test_dry_run_four_nodes_eight_gpus(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = submit(
        # overrides before and after the options
        "configs/demo.yaml",
        "optim.lr=5e-4",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--time",
        "600",
        "--run-dir",
        str(run),
        "model.image_set.num_embeds=2",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    script, _, rest = r.stdout.partition("# every task runs:")
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",  # one task per GPU
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=USR2@120",  # the warning before the time limit
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",  # a requeued job appends to its logs
        "#SBATCH --time=600",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
    ):
        assert line in script.splitlines(), line
    assert f"srun --unbuffered --output {run}/slurm/%j/%j_%t_log.out" in script
    assert "-m submitit.core._submit" in script
    requeue = next(x for x in rest.splitlines() if x.startswith("# requeued"))
    assert requeue.endswith(f"train {run}/config.yaml --run-dir {run} --resume latest")
    resolved = rest.split("# resolved config", 1)[1].split("\n", 1)[1]
    cfg = config_lib.load(["configs/demo.yaml"], ["optim.lr=5e-4", "model.image_set.num_embeds=2"])
    assert resolved.strip() == config_lib.to_yaml(cfg).strip()
    assert not run.exists()  # a dry run writes nothing


def test_train_job_requeues_itself_with_resume_latest() -> None:
    job = TrainJob("/runs/a/config.yaml", "/runs/a", overwrite=True)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        again = job.checkpoint()
        # From the requeue on, the step's SIGTERM is expected: ignored by this rank and by the
        # `scontrol requeue` child submitit starts next (SIG_IGN survives exec).
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert again.function == TrainJob("/runs/a/config.yaml", "/runs/a", resume="latest")
    assert again.args == () and again.kwargs == {}


def test_any_restart_resumes_and_never_overwrites_again() -> None:
    """Slurm restarting the job for any reason (scontrol requeue, node failure, preemption
    without a signal) runs the pickled first submission again: it must resume, not refuse."""
    first = TrainJob("/runs/a/config.yaml", "/runs/a", overwrite=True)
    assert first.started({}) == first.started({"SLURM_RESTART_COUNT": "0"}) == first
    for count in ("1", "7"):
        assert first.started({"SLURM_RESTART_COUNT": count}) == TrainJob(
            "/runs/a/config.yaml", "/runs/a", resume="latest", overwrite=False
        )
    chosen = TrainJob("/runs/a/config.yaml", "/runs/a", resume="/runs/a/checkpoints/step9")
    assert chosen.started({"SLURM_RESTART_COUNT": "1"}).resume == "latest"  # the newest one


def test_clear_errors_before_anything_is_queued(tmp_path: Path) -> None:
    no_slurm = {**CLEAN_ENV, "PATH": str(tmp_path / "empty")}  # whatever this machine has
    r = submit("configs/demo.yaml", "--nodes", "2", "--run-dir", str(tmp_path / "a"), env=no_slurm)
    assert r.returncode == 2
    assert "'sbatch' is not on PATH" in r.stderr and "--local" in r.stderr
    assert not (tmp_path / "a").exists()
    r = submit("configs/demo.yaml", "train.nope=1", "--run-dir", str(tmp_path / "b"), "--dry-run")
    assert r.returncode == 2 and "train.nope" in r.stderr
    assert not (tmp_path / "b").exists()
    # Paths missing here only warn: they may exist on the cluster's filesystem.
    r = submit(
        "configs/demo.yaml",
        "data.train_shards=/cluster/fs/train-{000..009}.tar",
        "model.text.glove_path=/cluster/fs/glove.txt",
        "--run-dir",
        str(tmp_path / "c"),
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    assert "warning: config key 'data.train_shards'" in r.stderr
    assert "warning: config key 'model.text.glove_path'" in r.stderr
    # A job name with a newline wrote a line outside #SBATCH into the job script, and a time
    # limit of 1e12 minutes was taken: both are refused before anything is written.
    for bad, says in (
        (["--job-name", "run\nrm -rf /"], "--job-name must be 1-200 printable"),
        (["--job-name", ""], "--job-name must be"),
        (["--time", "1e12"], "--time must be minutes in (0, 525600]"),
        (["--time", "nan"], "--time must be"),
    ):
        r = submit("configs/demo.yaml", *bad, "--run-dir", str(tmp_path / "d"), "--dry-run")
        assert r.returncode == 2 and says in r.stderr, (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
    r = submit("configs/demo.yaml", "--job-name", "sweep-7.b", "--time", "525600",
               "--run-dir", str(tmp_path / "e"), "--dry-run")  # fmt: skip
    assert r.returncode == 0, r.stderr


# --- the same job on submitit's local executor: preempted, requeued, resumed ------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("cluster_data"))


def descendants(pid: int, depth: int = 99) -> list[int]:
    """Live processes below `pid` down to `depth` levels, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, level = [], [pid]
    for _ in range(depth):
        level = [c for p in level for c in children.get(p, [])]
        out += level
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_local_executor_preempted_job_requeues_and_resumes(data: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(data, epochs=3), "train.ckpt_every=3"]
    ref = subprocess.run(
        [sys.executable, "-m", "setdiv.cli", "train", "configs/demo.yaml", *overrides]
        + ["--run-dir", str(tmp_path / "ref"), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=CLEAN_ENV,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "job"
    proc = subprocess.Popen(
        [sys.executable, SUBMIT, "configs/demo.yaml", *overrides]
        + ["--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1"]
        + ["--time", "10", "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=CLEAN_ENV,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 200
        while time.time() < deadline and proc.poll() is None and last_step(run) < 8:
            time.sleep(0.05)
        (controller,) = descendants(proc.pid, depth=1)
        signalled = descendants(controller)  # the tasks and their data workers
        assert 8 <= last_step(run) < 24 and len(signalled) >= 2, "not preempted mid-run"
        for pid in signalled:  # what SLURM does on preemption: USR2 to the job step
            with contextlib.suppress(ProcessLookupError):  # a data worker ending its epoch
                os.kill(pid, signal.SIGUSR2)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "finished: FINISHED" in out

    log = next((run / "slurm").glob("*/*_0_log.err")).read_text()
    starts = [
        line.split("training from step ")[1] for line in log.splitlines() if "training from" in line
    ]
    assert len(starts) == 2, log[-3000:]
    assert starts[0].startswith("0 (epoch 0, batch 0)")
    resumed_at = int(starts[1].split()[0])
    assert resumed_at in (6, 8, 9, 12, 15, 16, 18, 21)  # a checkpoint (every 3, epoch ends)
    assert "Calling checkpoint method" in log and "Requeued job" in log

    a, b = losses(tmp_path / "ref"), losses(run)
    assert sorted(b) == sorted(a) == list(range(1, 25))  # same final step count
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]  # and the same run, exactly
    time.sleep(1)
    assert processes_mentioning(str(run)) == []  # no task, worker or controller left behind
