"""Run-directory ownership: the lock file (live, stale, reused pid, requeued job, other host),
overwrite, and the resume config check. The whole-process behaviour is in test_train.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from setdiv.train import rundir
from setdiv.train.rundir import RunDirError, check_resume_config, claim

LOCK_FILE = "train.lock"


def write_lock(run: Path, **owner: object) -> None:
    run.mkdir(parents=True, exist_ok=True)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "start": None, "job": None}
    (run / LOCK_FILE).write_text(json.dumps({**base, "since": "then", **owner}))


def enter(*args: object, **kwargs: object) -> None:
    """Claim and let go at once."""
    with claim(*args, **kwargs):  # type: ignore[arg-type]
        pass


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_live_lock_refuses_and_is_left_alone(tmp_path: Path) -> None:
    write_lock(tmp_path)  # this very process: alive
    before = (tmp_path / LOCK_FILE).read_text()
    with pytest.raises(RunDirError, match=f"being trained by pid {os.getpid()} on host"):
        enter(tmp_path, tiny_config(), None)
    assert (tmp_path / LOCK_FILE).read_text() == before


def test_other_host_lock_refuses(tmp_path: Path) -> None:
    write_lock(tmp_path, host="some-other-node", pid=1)
    with pytest.raises(RunDirError, match="on host some-other-node"):
        enter(tmp_path, tiny_config(), None)


@pytest.mark.parametrize(
    "owner",
    [
        {"pid": "dead"},  # the process is gone
        {"start": -1},  # the pid is alive but belongs to another process now (reused)
        {"host": "old-node", "job": "4242"},  # an earlier attempt of this requeued job
    ],
    ids=["dead-pid", "reused-pid", "same-job"],
)
def test_stale_lock_is_taken_over_and_released(
    tmp_path: Path, owner: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if owner.get("pid") == "dead":
        owner = {"pid": dead_pid()}
    write_lock(tmp_path, **owner)
    with claim(tmp_path, tiny_config(), None):
        mine = json.loads((tmp_path / LOCK_FILE).read_text())
        assert mine["pid"] == os.getpid() and mine["job"] == "4242"
        with pytest.raises(RunDirError, match="being trained"):  # now it is ours, and live
            enter(tmp_path, tiny_config(), None)
    assert not (tmp_path / LOCK_FILE).exists()


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds a run: pass --resume latest"):
        enter(tmp_path, tiny_config(), None)
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RunDirError, match="contradict"):
        enter(tmp_path, tiny_config(), "latest", overwrite=True)
    with claim(tmp_path, tiny_config(), None, overwrite=True):
        assert not rundir.holds_run(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go
    # A config.yaml alone (what cluster/submit.py writes before the job starts) is no run.
    (tmp_path / "config.yaml").write_text("{}\n")
    enter(tmp_path, tiny_config(), None)


def test_resume_config_must_match_except_operational_keys(tmp_path: Path) -> None:
    from setdiv import config as config_lib

    config_lib.save(tiny_config("train.epochs=3"), tmp_path / "config.yaml")
    check_resume_config(tiny_config("train.epochs=3", "train.log_every=7"), tmp_path)
    with pytest.raises(RunDirError, match=r"2 key\(s\): model.embed_dim: 16 -> 32; optim.lr"):
        check_resume_config(
            tiny_config("train.epochs=3", "model.embed_dim=32", "optim.lr=1"), tmp_path
        )


def test_a_training_that_failed_before_recording_anything_leaves_no_run(tmp_path: Path) -> None:
    """A training that failed before its first record left `tb/` (and an empty records file
    and checkpoints folder, and its config.yaml): a plain retry was refused as "already holds
    a run" and a resume as a config mismatch. Neither is refused now, and the leftovers are
    cleared for the new start; anything else in the folder stays."""
    from setdiv import config as config_lib

    def leave_failed_start() -> None:
        (tmp_path / "tb").mkdir(exist_ok=True)
        (tmp_path / "tb" / "events.out.tfevents.1.host").write_bytes(b"\0" * 40)
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        (tmp_path / "metrics.jsonl").write_text("")
        config_lib.save(tiny_config("model.embed_dim=32"), tmp_path / "config.yaml")
        (tmp_path / "notes.txt").write_text("mine")

    leave_failed_start()
    assert not rundir.holds_run(tmp_path)
    with claim(tmp_path, tiny_config(), None):  # a plain retry, with a corrected config
        assert not any((tmp_path / n).exists() for n in ("tb", "checkpoints", "metrics.jsonl"))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    leave_failed_start()
    enter(tmp_path, tiny_config(), "latest")  # a resume: nothing to match the config against
    # one record makes it a run again
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="already holds a run"):
        enter(tmp_path, tiny_config(), None)
