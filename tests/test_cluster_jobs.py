"""cluster/jobs.py: children in their own session are stopped as a whole group when the trial
is stopped (Tune's stop arrives as SystemExit inside the reporting call) and when the process
that started them is killed outright; children never inherit a job's rank / rendezvous
variables."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import (
    CLEAN_ENV,
    ROOT,
    group_alive,
    tiny_overrides,
    wait_groups_gone,
    write_data,
)

from setdiv.distributed.jobs import child_env
from setdiv_cluster.jobs import run_child

FAMILY = [  # a leader that starts a grandchild, as `setdiv train` starts ranks and workers
    sys.executable,
    "-c",
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(300)']); print('up', flush=True); time.sleep(300)",
]


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_a_stopped_trial_takes_its_whole_process_group(tmp_path: Path) -> None:
    log = tmp_path / "log"

    def poll() -> None:  # what tune.report does when the scheduler stops the trial
        if "up" in log.read_text():
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        run_child(FAMILY, log, child_env(), poll=poll, interval_s=0.1, record=tmp_path / "l.jsonl")
    events = records(tmp_path / "l.jsonl")
    assert [e["event"] for e in events] == ["start", "end"]
    assert not group_alive(events[0]["pgid"])  # the leader and its grandchild, both gone


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_training_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A killed Ray actor runs no `finally`: the training's leader gets SIGTERM from the
    kernel, passes it to its ranks, and their data workers follow; the group is gone."""
    data = write_data(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "setdiv.cli", "train", str(ROOT / "configs/demo.yaml"),
        *tiny_overrides(data, epochs=200), "--run-dir", str(run), "--nproc", "2",
    ]  # fmt: skip
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from setdiv.distributed.jobs import child_env\nfrom setdiv_cluster.jobs import run_child\n"
        "run_child(json.loads(sys.argv[1]), Path(sys.argv[2]), child_env(), "
        "record=Path(sys.argv[3]))\n"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(cmd), str(tmp_path / "log"), str(tmp_path / "l")],
        env=CLEAN_ENV,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert (run / "metrics.jsonl").is_file(), (tmp_path / "log").read_text()[-3000:]
        pgid = records(tmp_path / "l")[0]["pgid"]
        assert group_alive(pgid)
    finally:
        starter.send_signal(signal.SIGKILL)
        starter.wait()
    assert wait_groups_gone([pgid], timeout_s=30) == []


def test_child_env_starts_a_job_of_its_own() -> None:
    parent = {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "3",
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1",
        "SLURM_PROCID": "5",
        "SLURM_JOB_ID": "9",
        "SUBMITIT_EXECUTOR": "slurm",
        "TORCHELASTIC_RUN_ID": "x",
    }
    assert child_env(threads=4, base=parent) == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "3",  # what Ray or SLURM gave this worker
        "OMP_NUM_THREADS": "4",
    }
