"""What runs on the allocated machines.

`TrainJob` is the object submitit pickles for every task of a training job: one rank of
`setdiv train`, reading its place in the job from the environment (`setdiv.distributed`).
On a timeout or preemption warning submitit calls its `checkpoint()` on global rank 0, which
requeues the same job with `--resume latest`.

`run_child` runs a `setdiv` command (a Ray trial's training run, an evaluation) as a child in
its own session, so that it and everything it starts (local ranks, data workers) can be
stopped as one process group, and so that it dies with its parent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import submitit

from setdiv.distributed.jobs import die_with_parent, is_job_variable
from setdiv.errors import report

__all__ = [
    "ChildFailedError",
    "TrainJob",
    "kill_group",
    "restart_count",
    "run_child",
    "submission_env",
]


class ChildFailedError(RuntimeError):
    """A `setdiv` child (training, export, evaluation) failed; its log holds the details, so
    the launcher reports it as one line and exits with `exit_code`."""

    exit_code = 1


@contextlib.contextmanager
def submission_env() -> Iterator[None]:
    """For the block, this process's environment without the job variables of a job it may
    be running in (so that sbatch starts a job of its own), site variables kept."""
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if is_job_variable(k)}
    try:
        yield
    finally:
        os.environ.update(hidden)


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often Slurm has started this job before (`SLURM_RESTART_COUNT`; 0 on a first start
    and outside Slurm). Any requeue counts: submitit's own (USR2 at the time limit or a
    preemption), `scontrol requeue` by an admin, a node failure, a preemption without a
    signal."""
    value = (os.environ if env is None else env).get("SLURM_RESTART_COUNT", "")
    return int(value) if value.strip().isdigit() else 0


@dataclass(frozen=True)
class TrainJob:
    """One task of a submitted training job: `setdiv train CONFIG --run-dir RUN_DIR`."""

    config: str
    """The resolved config, written into the run directory at submission."""
    run_dir: str
    resume: str | None = None
    """None for the first start; "latest" once requeued."""
    overwrite: bool = False
    """Delete the run in RUN_DIR and start again (first start only)."""

    def restarted(self) -> TrainJob:
        """The job as any restart runs it: continuing the run from its newest complete
        checkpoint, never overwriting it again."""
        return replace(self, resume="latest", overwrite=False)

    def started(self, env: Mapping[str, str] | None = None) -> TrainJob:
        """The job as this start must run it: `restarted()` when Slurm has started the job
        before (`restart_count` > 0, whatever requeued it), else as submitted (a run already
        in RUN_DIR is then refused unless --resume or --overwrite)."""
        return self if restart_count(env) == 0 else self.restarted()

    def __call__(self) -> str:
        from setdiv.distributed.jobs import job_from_env, log_as_rank
        from setdiv.train.launch import train

        job = self.started()
        log_as_rank(job_from_env())
        if job is not self:
            logging.getLogger(__name__).info(
                "restart %d of job %s: resuming the run in %s from its newest checkpoint",
                restart_count(), os.environ.get("SLURM_JOB_ID"), self.run_dir,
            )  # fmt: skip
        try:
            train(job.config, [], job.run_dir, job.resume, job.overwrite)
        except Exception as exc:  # noqa: BLE001 -- a user error is one line, as from `setdiv train`
            raise SystemExit(report("setdiv train", exc)) from None
        return self.run_dir

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on global rank 0 only, from its timeout / preemption signal
        handler. It saves nothing: a DeepSpeed save needs every rank (saving here would
        deadlock), and every rank already writes periodic checkpoints. It requeues this job,
        resuming from the newest complete checkpoint. From here on this rank is leaving:
        the SIGTERM that Slurm sends the step when it requeues is expected, and must not kill
        submitit's `scontrol requeue` child before it is done."""
        from setdiv.distributed.group import leaving

        leaving("requeued by the time limit / preemption signal")
        return submitit.helpers.DelayedSubmission(self.restarted())

    def command(self) -> str:
        """What every task runs, as the equivalent command line."""
        resume = ["--resume", self.resume] if self.resume else []
        overwrite = ["--overwrite"] * self.overwrite
        return shlex.join(
            ["setdiv", "train", self.config, "--run-dir", self.run_dir, *resume, *overwrite]
        )


def kill_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM to a process group, SIGKILL to what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_child(
    cmd: Sequence[str],
    log: Path,
    env: Mapping[str, str],
    *,
    cwd: str | Path | None = None,
    poll: Callable[[], None] | None = None,
    interval_s: float = 1.0,
    record: Path | None = None,
) -> int:
    """Run `cmd` as the leader of a new session with stdout + stderr appended to `log`; call
    `poll()` every `interval_s` while it runs and once after it ends. Returns its exit code.

    However this returns (an exception from `poll`, a SystemExit from Ray stopping a trial),
    the whole process group is stopped first; if this process dies, the leader gets SIGTERM
    (and `setdiv train` passes it on to its ranks). `record` (a JSONL file) gets one line per
    start and one per end, with the process group id.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,  # SIGTERM when this thread ends; only a prctl call
        )
    _record(record, {"event": "start", "pgid": proc.pid, "argv": list(cmd)})
    try:
        while proc.poll() is None:
            if poll is not None:
                poll()
            time.sleep(interval_s)
        if poll is not None:
            poll()
        return proc.returncode
    finally:
        kill_group(proc.pid)
        proc.wait()
        _record(record, {"event": "end", "pgid": proc.pid, "exit": proc.returncode})


def _record(path: Path | None, entry: dict) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps({**entry, "time": time.time()}) + "\n")
