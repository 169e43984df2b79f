"""cluster/ against a real Slurm (22.05, Debian's packages): two `slurmd` nodes on this machine
brought up by tools/slurm_local.sh (the `slurm_cluster` fixture). A 2-node job equal to
`setdiv train`; requeues by `scontrol requeue` and by the time limit's signal resuming step for
step; run-directory rules shared with `setdiv train`; sbatch rejections and arguments refused
before anything is queued; a master name that does not resolve; Ray head + worker across the
two nodes running a sweep and an ensemble, leaving nothing behind."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SlurmCluster
from run_helpers import (
    CLEAN_ENV,
    ROOT,
    losses,
    processes_mentioning,
    tiny_overrides,
    wait_for,
    write_data,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

SUBMIT = [sys.executable, str(ROOT / "cluster" / "submit.py")]
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1"]
BAD_LOG = ("Traceback", "killed by signal", "DataLoader worker", "Error requeuing")
"""What must not appear in the logs of a job that was only ever requeued or finished."""


def around_traceback(log: str) -> str:
    """The part of a job's log around its first traceback (or its end)."""
    return log[max(0, log.find("Traceback") - 3000) :][:6000]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("slurm_data"), train=256, val=64, test=64)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Epochs of 64 steps: a run that lasts a minute without a new pass every few steps."""
    return write_data(tmp_path_factory.mktemp("slurm_long_data"), train=2048)


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session's cluster, with no job of this test left queued or running after it."""
    yield slurm_cluster
    jobs = squeue(slurm_cluster)
    if jobs:
        run(slurm_cluster, "scancel", *jobs)
        wait_for("jobs cancelled", lambda: not squeue(slurm_cluster, "R,CG"), 60)


def run(cluster: SlurmCluster, *cmd: str, env: dict | None = None, timeout: int = 60):
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=cluster.env(env or CLEAN_ENV),
    )  # fmt: skip


def squeue(cluster: SlurmCluster, states: str = "all") -> list[str]:
    out = run(cluster, "squeue", "-h", "-t", states, "-o", "%A").stdout
    return out.split()


def job(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value."""
    out = run(cluster, "scontrol", "show", "job", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_done(cluster: SlurmCluster, job_id: str, timeout_s: float = 300.0) -> dict[str, str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_for(
        f"job {job_id} to end",
        lambda: (j := job(cluster, job_id)).get("JobState") in ended and j,
        timeout_s,
    )


def submit(cluster: SlurmCluster, *args: str, env: dict | None = None):
    return run(cluster, *SUBMIT, *args, env=env, timeout=120)


def job_id_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def logs(run_dir: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm" / job_id).glob("*_log.*")))


def reference(tmp: Path, overrides: list[str]) -> dict[int, float]:
    """The same training as `setdiv train --nproc 2`, losses by step."""
    r = subprocess.run(
        [sys.executable, "-m", "setdiv.cli", "train", "configs/demo.yaml", *overrides,
         "--run-dir", str(tmp), "--nproc", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=CLEAN_ENV,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(tmp)


@pytest.mark.timeout(900)
def test_two_node_job_equals_setdiv_train_and_run_dir_rules(
    slurm: SlurmCluster, data: Path, tmp_path: Path
) -> None:
    assert not Path("/etc/slurm/slurm.conf").exists()  # the cluster is found via SLURM_CONF only
    overrides = [*tiny_overrides(data, epochs=3), "train.ckpt_every=3"]
    ref = reference(tmp_path / "ref", overrides)
    assert sorted(ref) == list(range(1, 25))

    run_dir = tmp_path / "job"
    args = ["configs/demo.yaml", *overrides, "--nodes", "2", *CPU_JOB, "--time", "10"]
    inside_a_job = {  # submitting from a job step: none of this may reach the new job
        **CLEAN_ENV,
        **{"SLURM_JOB_ID": "77", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "RANK": "3"},
        **{"WORLD_SIZE": "8", "MASTER_ADDR": "node9", "MASTER_PORT": "1234"},
    }
    r = submit(slurm, *args, "--run-dir", str(run_dir), env=inside_a_job)
    first = job_id_of(r)
    assert f"logs: {run_dir}/slurm/{first}/{first}_<task>_log.out" in r.stdout
    assert f"run directory: {run_dir}" in r.stdout
    assert not (run_dir / "slurm" / "%j").exists()  # no empty literal folder left
    state = wait_done(slurm, first)
    assert state["JobState"] == "COMPLETED" and state["NodeList"] == "n[1-2]", state
    log = logs(run_dir, first)
    assert "rank 0 of 2, local rank 0, master n1:" in log and "node n1" in log
    assert "rank 1 of 2, local rank 0, master n1:" in log and "node n2" in log
    assert not any(bad in log for bad in BAD_LOG), around_traceback(log)
    assert losses(run_dir) == ref  # every step's loss, the final step included

    # A second plain submission into the finished run is refused before sbatch.
    again = submit(slurm, *args, "--run-dir", str(run_dir))
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr
    assert [p.name for p in (run_dir / "slurm").iterdir() if p.is_dir()] == [first]  # no new job

    # A run that died before its first checkpoint: records, no checkpoint.
    died = tmp_path / "died"
    died.mkdir()
    shutil.copy(run_dir / "config.yaml", died / "config.yaml")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (died / "metrics.jsonl").write_text("".join(lines[:2]))
    plain = submit(slurm, *args, "--run-dir", str(died))
    assert plain.returncode == 2 and "already holds a run" in plain.stderr
    # --resume continues it (from nothing: a fresh start), --overwrite starts the finished
    # run again; both as `setdiv train` would, both running at once on the two nodes' CPUs.
    resumed = job_id_of(submit(slurm, *args, "--run-dir", str(died), "--resume"))
    overwritten = job_id_of(submit(slurm, *args, "--run-dir", str(run_dir), "--overwrite"))
    both = "--resume", "--overwrite"
    clash = submit(slurm, *args, "--run-dir", str(died), *both)
    assert clash.returncode == 2 and "contradict" in clash.stderr
    for job_id, directory in ((resumed, died), (overwritten, run_dir)):
        assert wait_done(slurm, job_id)["JobState"] == "COMPLETED", logs(directory, job_id)
        assert losses(directory) == ref
    assert "--overwrite: deleting the run" in logs(run_dir, overwritten)
    assert "no checkpoint in" in logs(died, resumed)


def release(cluster: SlurmCluster, job_id: str, *changes: str) -> None:
    """A requeued job is held ~2 minutes (BeginTime): let it start again now."""
    wait_for(
        "the requeued job to be pending", lambda: job(cluster, job_id)["JobState"] == "PENDING"
    )
    r = run(cluster, "scontrol", "update", f"JobId={job_id}", "StartTime=now", *changes)
    assert r.returncode == 0, r.stderr


def starts(run_dir: Path, job_id: str) -> list[int]:
    """Where each start of the job began training (rank 0's log)."""
    log = run_dir / "slurm" / job_id / f"{job_id}_0_log.err"
    text = log.read_text() if log.is_file() else ""
    return [int(s) for s in re.findall(r"training from step (\d+)", text)]


def logged_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.timeout(900)
def test_scontrol_requeue_and_the_time_limit_both_resume_the_run(
    slurm: SlurmCluster, long_data: Path, tmp_path: Path
) -> None:
    """One job, three starts: `scontrol requeue` (SIGTERM, no signal to submitit, the job
    restarts from its pickled submission), then a real time limit reached with --signal-delay
    (USR2, submitit's checkpoint and requeue), then to the end. Its losses are the
    uninterrupted run's, step for step, and its logs hold no traceback."""
    overrides = [*tiny_overrides(long_data, epochs=8), "train.ckpt_every=20"]
    ref = reference(tmp_path / "ref", overrides)
    run_dir = tmp_path / "job"
    job_id = job_id_of(
        submit(
            slurm,
            "configs/demo.yaml",
            *overrides,
            "--nodes",
            "2",
            *CPU_JOB,
            "--time",
            "10",
            "--signal-delay",
            "110",
            "--run-dir",
            str(run_dir),
        )  # fmt: skip
    )
    wait_for("step 30", lambda: logged_step(run_dir) >= 30, 300)
    assert run(slurm, "scontrol", "requeue", job_id).returncode == 0
    release(slurm, job_id)
    wait_for("a second start", lambda: len(starts(run_dir, job_id)) == 2, 300)
    first_resumed = starts(run_dir, job_id)[1]
    assert first_resumed > 0  # from its newest checkpoint, not from scratch
    wait_for("steps after the restart", lambda: logged_step(run_dir) >= first_resumed + 30, 300)
    # The time limit, brought near: USR2 is due at once (110 s before a 2-minute limit; Slurm
    # checks limits every 30 s, so it comes well before the limit itself).
    assert run(slurm, "scontrol", "update", f"JobId={job_id}", "TimeLimit=2").returncode == 0
    release(slurm, job_id, "TimeLimit=10")
    state = wait_done(slurm, job_id)
    log = logs(run_dir, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", (state, log[-3000:])
    resumed = starts(run_dir, job_id)
    assert len(resumed) == 3 and 0 < resumed[1] < resumed[2], resumed
    assert "restart 1 of job" in log and "restart 2 of job" in log
    assert "Caught signal SIGUSR2" in log and f"Requeued job {job_id}" in log
    assert not any(bad in log for bad in BAD_LOG), around_traceback(log)
    assert losses(run_dir) == ref


@pytest.mark.timeout(300)
def test_rejections_and_bad_arguments_leave_nothing_behind(
    slurm: SlurmCluster, data: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(data, epochs=1)
    before = squeue(slurm)
    # sbatch refuses a GPU request on the CPU nodes: one line, exit 2, nothing written ...
    fresh = tmp_path / "fresh"
    gpu = submit(slurm, "configs/demo.yaml", *overrides, "--gpus-per-node", "1",
                 "--run-dir", str(fresh))  # fmt: skip
    assert gpu.returncode == 2, gpu.stderr
    assert gpu.stderr.strip().count("\n") == 0, gpu.stderr
    assert "sbatch refused the job" in gpu.stderr and "generic resource" in gpu.stderr
    assert not fresh.exists()
    # ... and in a directory that was there before, nothing changes (its config included).
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "config.yaml").write_text("# the user's own\n")
    (kept / "notes.txt").write_text("mine\n")
    gpu = submit(slurm, "configs/demo.yaml", *overrides, "--gpus-per-node", "1",
                 "--run-dir", str(kept))  # fmt: skip
    assert gpu.returncode == 2 and "sbatch refused the job" in gpu.stderr
    assert sorted(p.name for p in kept.rglob("*")) == ["config.yaml", "notes.txt"]
    assert (kept / "config.yaml").read_text() == "# the user's own\n"
    # A time limit too short for the requeue signal's delay is refused before sbatch.
    short = submit(slurm, "configs/demo.yaml", *overrides, "--time", "1", "--run-dir", str(fresh))
    assert short.returncode == 2 and "--signal-delay 120 s does not fit --time 1" in short.stderr
    for bad in (["--time", "nan"], ["--time", "inf"], ["--max-requeues", "-1"], ["--nodes", "0"]):
        r = submit(slurm, "configs/demo.yaml", *overrides, *bad, "--run-dir", str(fresh))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr, bad
    assert not fresh.exists() and squeue(slurm) == before


@pytest.mark.timeout(300)
def test_a_master_that_does_not_resolve_fails_within_the_timeout(
    slurm: SlurmCluster, data: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "job"
    r = submit(
        slurm, "configs/demo.yaml", *tiny_overrides(data, epochs=1), "train.dist_timeout=60",
        "--partition", "unresolvable", "--nodes", "1", "--gpus-per-node", "0",
        "--tasks-per-node", "2", "--cpus-per-task", "1", "--run-dir", str(run_dir),
    )  # fmt: skip
    job_id = job_id_of(r)
    state = wait_done(slurm, job_id, timeout_s=120)
    log = logs(run_dir, job_id)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "4:0", (state, log[-2000:])
    for rank in (0, 1):
        assert f"rank {rank} of 2 (slurm): the master address 'nunresolvable1'" in log
    assert "does not resolve" in log and "Traceback" not in log
    start, end = (time.mktime(time.strptime(state[k], "%Y-%m-%dT%H:%M:%S")) for k in
                  ("StartTime", "EndTime"))  # fmt: skip
    assert end - start < 60  # at once, not after the rendezvous timeout


def ray_job(slurm: SlurmCluster, tmp: Path, name: str, *driver: str) -> tuple[str, Path]:
    out = tmp / f"{name}.out"
    env = {
        **CLEAN_ENV,
        "SETDIV_RAY_TEMP_DIR": str(tmp / "ray"),
        "SETDIV_RAY_TOKEN_DIR": str(tmp / "tokens"),
    }
    r = run(
        slurm, "sbatch", "--nodes", "2", "--cpus-per-task", "1", f"--output={out}",
        "cluster/ray_slurm.sbatch", *driver, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[-1], out


@pytest.mark.timeout(900)
def test_ray_across_two_slurm_nodes_sweep_and_ensemble(
    slurm: SlurmCluster, data: Path, tmp_path: Path
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sdrs", dir="/tmp"))  # Ray's socket paths: short
    try:
        common = ["configs/demo.yaml", *tiny_overrides(data, epochs=2, val=True)]
        sweep_id, sweep_out = ray_job(
            slurm, tmp, "sweep", "cluster/sweep.py", *common,
            "--space", "optim.lr=grid:1e-4,2e-4,3e-4,4e-4", "--samples", "1",
            "--scheduler", "fifo", "--storage", str(tmp / "sweeps"), "--name", "s",
        )  # fmt: skip
        state = wait_done(slurm, sweep_id, 600)
        out = sweep_out.read_text()
        assert state["JobState"] == "COMPLETED", out[-3000:]
        assert "2 Ray nodes up at" in out and "token authentication" in out
        with open(tmp / "sweeps/s/results.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}, rows
        assert {r["node"] for r in rows} == {"n1", "n2"}  # trials ran on both Ray nodes
        assert (tmp / "sweeps/s/best.yaml").is_file()

        ens_id, ens_out = ray_job(
            slurm, tmp, "ensemble", "cluster/ensemble.py", *common, "--seeds", "0,1",
            "--test-data", f"{data}/test-*.tar", "--protocol", "coco", "--backend", "ray",
            "--storage", str(tmp / "ensembles"), "--name", "e",
        )  # fmt: skip
        state = wait_done(slurm, ens_id, 600)
        assert state["JobState"] == "COMPLETED", ens_out.read_text()[-3000:]
        summary = json.loads((tmp / "ensembles/e/ensemble.json").read_text())
        assert sorted(summary["members"]) == ["seed0", "seed1"]

        time.sleep(2)
        assert list((tmp / "tokens").iterdir()) == []  # the job's token is removed
        for trace in (str(tmp), "raylet", "gcs_server", "slurmstepd"):
            assert processes_mentioning(trace) == [], trace  # no Ray, step or training left
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
