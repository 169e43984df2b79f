"""One Ray Tune trial = one `setdiv train` run.

The trial starts `setdiv train BASE.yaml OVERRIDES... --run-dir RUN --resume latest` as a
child in its own session (`cluster.jobs.run_child`) with a clean environment (its own free
rendezvous port, no inherited job variables), reads the run's `metrics.jsonl` while it trains
and reports each epoch's `val_rsum` through `ray.tune.report`, with a small checkpoint that
remembers how many epochs were reported. When Ray retries a crashed trial or resumes an
interrupted sweep, the trial starts again with `--resume latest`: the run continues from its
own newest checkpoint and epochs already reported are not reported twice.

A run that diverges (`setdiv train` exit code 3, or a non-finite `val_rsum`) is a failed trial:
it is marked in its run directory so a retry fails at once instead of diverging again.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setdiv.distributed.jobs import child_env, setdiv_command
from setdiv.paths import RunFiles
from setdiv_cluster.jobs import ChildFailedError, run_child

__all__ = [
    "NonFiniteTrialError",
    "TrialSpec",
    "TrialUserError",
    "node_name",
    "overrides_for",
    "run_dir_for",
    "run_trial",
    "run_training",
    "trial_node",
    "trial_tuner",
    "val_records",
]

USER_ERROR_EXIT = 2
"""`setdiv train`'s exit code for a user error (bad config, missing file, run dir in use)."""
NONFINITE_EXIT = 3
"""`setdiv train`'s exit code for a run stopped on non-finite losses."""
NONFINITE_MARK = "NONFINITE"
USER_ERROR_MARK = "USER_ERROR"


class NonFiniteTrialError(ChildFailedError):
    """The run diverged: a failed trial, never the best one."""


class TrialUserError(ChildFailedError):
    """`setdiv train` refused the run (exit code 2): running it again fails the same way, so
    it is never retried; the message is its error line."""

    exit_code = USER_ERROR_EXIT


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of a sweep / ensemble shares (the sampled values come per trial)."""

    config: str
    """Absolute path of the base YAML."""
    overrides: tuple[str, ...]
    """The user's dotted overrides, before the sampled ones."""
    runs_dir: str
    """Absolute directory holding one run directory per trial."""
    cwd: str
    """Where `setdiv train` runs: relative paths in the config resolve against it."""
    ties: tuple[tuple[str, str], ...] = ()
    """(key, source): `key` takes the sampled value of `source`."""
    nproc: int = 1
    """Local ranks per trial (`setdiv train --nproc`)."""
    threads: int = 1
    """OMP threads per rank."""
    epochs: int = 0
    """train.epochs of the runs: the last epoch is reported once the run has ended (a
    scheduler stopping the trial at its last epoch must not cut the final checkpoint)."""
    run_name_key: str | None = None
    """Name run directories after this sampled key's value (e.g. train.seed -> seed3), not
    after the trial id."""
    poll_s: float = 1.0


def overrides_for(values: Mapping[str, Any], ties: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The sampled values plus the tied keys, as dotted key -> value."""
    out = dict(values)
    for key, source in ties:
        if key not in values:
            out[key] = values[source]
    return out


def _dotlist(values: Mapping[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]  # JSON scalars read as YAML


def val_records(metrics: Path) -> list[dict[str, Any]]:
    """The `val_rsum` records of a run's metrics.jsonl so far (a torn last line is skipped)."""
    out = []
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_rsum" in record:
            out.append(record)
    return out


class _Reporter:
    """Reports new validation epochs of a run to Tune."""

    def __init__(self, run_dir: Path, reported: int, last_epoch: int) -> None:
        self.run_dir, self.reported, self.last_epoch = run_dir, reported, last_epoch

    def poll(self, ended: bool = False) -> None:
        from ray import tune

        for record in val_records(RunFiles(self.run_dir).metrics):
            epoch, value = int(record["epoch"]), float(record["val_rsum"])
            if epoch <= self.reported or (epoch >= self.last_epoch and not ended):
                continue
            if not math.isfinite(value):
                _fail_nonfinite(self.run_dir, f"val_rsum {value} at epoch {epoch}")
            with tempfile.TemporaryDirectory() as d:
                Path(d, "trial.json").write_text(json.dumps({"epoch": epoch}))
                tune.report(
                    {"val_rsum": value, "epoch": epoch, "step": int(record["step"])},
                    checkpoint=tune.Checkpoint.from_directory(d),
                )
            self.reported = epoch


def _fail_nonfinite(run_dir: Path, why: str) -> None:
    (run_dir / NONFINITE_MARK).write_text(why + "\n")
    raise NonFiniteTrialError(f"{run_dir}: diverged ({why})")


def _reported_epochs() -> int:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        return int(json.loads(Path(d, "trial.json").read_text())["epoch"])


def run_dir_for(spec: TrialSpec, values: Mapping[str, Any], trial_id: str) -> Path:
    """runs_dir/<trial id>, or runs_dir/<key><value> when runs are named by a key (seed3)."""
    if spec.run_name_key is None:
        return Path(spec.runs_dir) / trial_id
    return (
        Path(spec.runs_dir) / f"{spec.run_name_key.rsplit('.', 1)[-1]}{values[spec.run_name_key]}"
    )


def run_training(
    spec: TrialSpec,
    values: Mapping[str, Any],
    run_dir: Path,
    poll: Callable[[], None] | None = None,
) -> None:
    """`setdiv train` with the trial's values into `run_dir` (resuming it if it holds a
    checkpoint) as a child in its own session. Raises `NonFiniteTrialError` if the run diverges
    (now or in an earlier attempt), `ChildFailedError` with the log's tail if it fails otherwise."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / NONFINITE_MARK).is_file():  # a retry of a diverged run diverges again
        raise NonFiniteTrialError(f"{run_dir}: diverged before ({NONFINITE_MARK} file)")
    cmd = setdiv_command(
        "train",
        spec.config,
        *spec.overrides,
        *_dotlist(values),
        "--run-dir",
        str(run_dir),
        "--resume",
        "latest",
        "--nproc",
        str(spec.nproc),
    )
    code = run_child(
        cmd,
        run_dir / "train.log",
        child_env(threads=spec.threads),
        cwd=spec.cwd,
        poll=poll,
        interval_s=spec.poll_s,
        record=run_dir / "launches.jsonl",
    )
    if code == NONFINITE_EXIT:
        _fail_nonfinite(run_dir, "training stopped on non-finite losses")
    if code == 0:
        return
    tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-15:]
    if code == USER_ERROR_EXIT:
        error = next((x for x in reversed(tail) if ": error: " in x), tail[-1] if tail else "")
        raise TrialUserError(f"{run_dir}: {error.strip()}")
    raise ChildFailedError(
        f"setdiv train exited with code {code} ({run_dir / 'train.log'}):\n" + "\n".join(tail)
    )


def run_trial(config: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune trainable (bind `spec` with `tune.with_parameters`): trains, reporting each
    validation epoch. A run that `setdiv train` refuses (exit code 2) ends the trial without
    an error, so Ray does not retry it, marked in its run directory (`USER_ERROR_MARK`) with
    the message for the table. The node the trial ran on is recorded in `trial.json`."""
    from ray import tune

    values = overrides_for(config, spec.ties)
    trial_id = tune.get_context().get_trial_id()
    run_dir = run_dir_for(spec, values, trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "trial.json").write_text(
        json.dumps({"trial_id": trial_id, "values": values, "node": node_name()})
    )
    reporter = _Reporter(run_dir, _reported_epochs(), spec.epochs)
    try:
        run_training(spec, values, run_dir, reporter.poll)
    except TrialUserError as exc:
        (run_dir / USER_ERROR_MARK).write_text(str(exc) + "\n")
        return
    reporter.poll(ended=True)


def node_name() -> str:
    """The node this process runs on, by its Slurm name where Slurm started it (several Slurm
    nodes may share one host, as in tools/slurm_local.sh), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def trial_node(run_dir: Path) -> str:
    """The node a trial's run recorded in its trial.json ("" if none)."""
    try:
        return str(json.loads((run_dir / "trial.json").read_text()).get("node", ""))
    except (OSError, ValueError):
        return ""


def trial_tuner(
    spec: TrialSpec,
    exp_dir: Path,
    resources: dict[str, int],
    max_failures: int,
    param_space: dict[str, Any],
    tune_config: Any,
    what: str,
) -> Any:
    """A Ray Tune `Tuner` of `run_trial` (each trial with `resources`, retried `max_failures`
    times) writing to `exp_dir`; if `exp_dir` holds an interrupted one, that one, resumed
    (errored trials included) and said so, naming `what` it runs."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"resuming the {what} in {exp_dir}")
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )
