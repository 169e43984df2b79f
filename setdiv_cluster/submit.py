"""Submit `setdiv train` to SLURM through submitit: one task per GPU, requeued on timeout and
preemption, resuming from the newest checkpoint.

    python cluster/submit.py configs/resnext_bert.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 1440 optim.lr=2e-4
    python cluster/submit.py configs/demo.yaml --nodes 4 --gpus-per-node 8 --dry-run
    python cluster/submit.py configs/demo.yaml --local --gpus-per-node 0 --tasks-per-node 2

The config (with its KEY=VALUE overrides, which may come before or after the options) is
validated here, before anything is queued; data and weight paths that do not exist on this
machine only warn, they may live on the cluster's filesystem. The resolved config is written
to RUN_DIR/config.yaml and the job trains from it. submitit writes the sbatch script, the
pickled job and the task logs to RUN_DIR/slurm/<job id>/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string  # pinned submitit==1.5.4; no public API

from setdiv import config as config_lib
from setdiv import errors
from setdiv.errors import UserError, check_at_least
from setdiv.paths import RunFiles
from setdiv.train import rundir
from setdiv_cluster import jobs
from setdiv_cluster.cli import run_cli
from setdiv_cluster.jobs import TrainJob

__all__ = ["build_parser", "executor_parameters", "main", "sbatch_script"]


def build_parser() -> argparse.ArgumentParser:
    p = errors.ArgumentParser(
        prog="cluster/submit.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config (a delta over the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4")
    p.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node, 0 for a CPU job (default: 8; with --local: this machine's GPUs)",
    )
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="ranks per node (default: one per GPU, 1 for a CPU job)",
    )
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per rank")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument(
        "--time", type=float, default=24 * 60, help="time limit in minutes (SLURM: rounded up)"
    )
    p.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        help="seconds before the time limit at which the requeue signal (USR2) arrives",
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=10,
        help="requeues by the time limit / preemption signal after which submitit stops "
        "requeueing (a signal in the last 20%% of the time limit, or its last 10 minutes if "
        "earlier, counts; see docs/cluster.md)",
    )
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/NAME-DATE)")
    p.add_argument("--job-name", default=None, help="job name (default: setdiv-CONFIG)")
    p.add_argument("--resume", action="store_true", help="continue the run already in --run-dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--run-dir holds a run: the job deletes it and starts again (as setdiv train)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script and config, submit nothing"
    )
    p.add_argument(
        "--local",
        action="store_true",
        help="run the same job with submitit's local executor on this machine, and wait for it",
    )
    return p


def executor_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """AutoExecutor parameters: generic names, `slurm_` for the SLURM-only ones."""
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    params: dict[str, Any] = {
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": math.ceil(args.time),
        "name": args.job_name,
        "slurm_signal_delay_s": args.signal_delay,
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        # requeue explicitly allowed: sites with JobRequeue=0 refuse `scontrol requeue` otherwise
        "slurm_additional_parameters": {"requeue": True},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(params: dict[str, Any], folder: Path) -> str:
    """The sbatch script submitit would write for `params`, without needing SLURM here."""
    native = {k[len("slurm_") :]: v for k, v in params.items() if k.startswith("slurm_")}
    renames = submitit.SlurmExecutor._equivalence_dict() or {}
    native |= {renames.get(k, k): v for k, v in params.items() if not k.startswith("slurm_")}
    command = (
        f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    )
    return _make_sbatch_string(command=command, folder=folder, **native)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _warn_missing_paths(cfg: config_lib.Config) -> None:
    from setdiv.data.reader import ShardSet

    for key, value in config_lib.paths(cfg).items():
        try:
            if key.endswith("shards"):
                ShardSet.resolve(value, fmt=cfg.data.format)
            elif not Path(value).exists():
                raise FileNotFoundError(value)
        except (FileNotFoundError, UserError) as exc:
            print(
                f"warning: config key '{key}': {exc} on this machine "
                "(fine if it exists on the cluster's filesystem)",
                file=sys.stderr,
            )


SIGNAL_EARLY_S = 30
"""Slurm may deliver the time-limit signal up to this much before --signal-delay."""
MIN_WORK_S = 60
"""Training time a job must get before its time-limit signal can arrive."""
MAX_TIME_MIN = 365 * 24 * 60
"""The longest --time taken: a year of minutes (Slurm would take far more, no site does)."""


def _run_dir(args: argparse.Namespace, name: str, cfg: config_lib.Config) -> Path:
    """The run directory, checked as `setdiv train` checks it (`rundir.check_start`)."""
    run_dir = Path(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    rundir.check_start(run_dir, cfg, "latest" if args.resume else None, args.overwrite)
    return run_dir


def _check(args: argparse.Namespace) -> None:
    """Every argument, before anything is read, written or started."""
    check_at_least(
        {
            "--nodes": (args.nodes, 1),
            "--cpus-per-task": (args.cpus_per_task, 1),
            "--gpus-per-node": (args.gpus_per_node, 0),
            "--tasks-per-node": (args.tasks_per_node, 1),
            "--signal-delay": (args.signal_delay, 0),
            "--max-requeues": (args.max_requeues, 0),
        }
    )
    if not (0 < args.time <= MAX_TIME_MIN):
        raise UserError(
            f"--time must be minutes in (0, {MAX_TIME_MIN}] (365 days), got {args.time:g}"
        )
    name = args.job_name
    if name is not None and (
        not name or len(name) > 200 or any(c.isspace() or not c.isprintable() for c in name)
    ):  # (the name goes into an #SBATCH line of the job script)
        raise UserError(
            f"--job-name must be 1-200 printable characters without spaces, got {name!r}"
        )
    if args.local and args.nodes > 1:
        raise UserError("--local runs on this machine: --nodes must be 1")
    limit_s = (args.time if args.local else math.ceil(args.time)) * 60
    work_s = limit_s - args.signal_delay - SIGNAL_EARLY_S
    if work_s < MIN_WORK_S:
        most = int(limit_s - SIGNAL_EARLY_S - MIN_WORK_S)
        fix = f"--signal-delay {most} or less" if most >= 0 else "a longer --time"
        raise UserError(
            f"--signal-delay {args.signal_delay} s does not fit --time {args.time:g} min: the "
            f"requeue signal may arrive up to {SIGNAL_EARLY_S} s before the delay, leaving "
            f"{max(work_s, 0):.0f} s to train (at least {MIN_WORK_S} s needed); use {fix}"
        )


def _executor(args: argparse.Namespace, params: dict[str, Any], folder: Path) -> Any:
    if args.local:
        ex = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        local = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        local |= {"timeout_min": args.time, "signal_delay_s": args.signal_delay}
        ex.update_parameters(**local)
        return ex
    try:
        ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    except RuntimeError as exc:  # e.g. sbatch without srun
        raise UserError(f"cannot submit to SLURM from here: {exc}") from None
    ex.update_parameters(**params)
    return ex


def submit(args: argparse.Namespace) -> int:
    if args.gpus_per_node is None:
        args.gpus_per_node = _local_gpus() if args.local else 8
    _check(args)
    cfg = config_lib.load([args.config], args.overrides)  # unknown keys fail before queueing
    _warn_missing_paths(cfg)
    name = args.job_name or f"setdiv-{Path(args.config).stem}"
    args.job_name = name
    run_dir = _run_dir(args, name, cfg)
    params = executor_parameters(args)
    folder = run_dir / "slurm" / "%j"
    job = TrainJob(
        str(RunFiles(run_dir).config),
        str(run_dir),
        "latest" if args.resume else None,
        overwrite=args.overwrite,
    )
    if args.dry_run:
        print(sbatch_script(params, folder))
        print(f"# every task runs: {job.command()}")
        print(f"# requeued (any requeue) as: {job.restarted().command()}")
        print(f"# resolved config ({job.config}):")
        print(config_lib.to_yaml(cfg))
        return 0
    if not args.local and shutil.which("sbatch") is None:
        raise UserError(
            "SLURM was asked for but 'sbatch' is not on PATH: submit from a SLURM login node, "
            "or pass --local to run on this machine"
        )
    with _undone_on_failure(run_dir):
        executor = _executor(args, params, folder)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save(cfg, job.config)
        submitted = _submit(executor, job)
    logs = [
        str(p).replace("_0_log", "_<task>_log")
        for p in (submitted.paths.stdout, submitted.paths.stderr)
    ]
    print(f"submitted job {submitted.job_id}")
    print(f"logs: {logs[0]}\n      {logs[1]}")
    print(f"run directory: {run_dir}")
    if args.local:
        submitted.results()  # every task's result; raises if the job failed for good
        print(f"job {submitted.job_id} finished: {submitted.state}")
    return 0


def _submit(executor: Any, job: TrainJob) -> Any:
    """`executor.submit(job)` with no variable of a job we may be running in (site variables
    such as SLURM_CONF kept); sbatch refusing the job is one line naming its reason."""
    stderr = io.StringIO()  # submitit prints sbatch's stderr before raising: ours is one line
    try:
        with jobs.submission_env(), contextlib.redirect_stderr(stderr):
            submitted = executor.submit(job)
    except submitit.core.utils.FailedJobError as exc:
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        reason = "; ".join(x.split(": ", 2)[-1] if x.startswith("sbatch:") else x for x in lines)
        raise UserError(f"sbatch refused the job: {reason or 'no message'}") from None
    sys.stderr.write(stderr.getvalue())
    return submitted


@contextlib.contextmanager
def _undone_on_failure(run_dir: Path) -> Iterator[None]:
    """If the block fails, leave `run_dir` as it was before: what the block created in it is
    removed (the whole directory, if the block created it), a `config.yaml` it rewrote gets its
    old bytes back. Either way, an empty literal `slurm/%j` that submitit makes is removed."""
    existed, config = run_dir.exists(), RunFiles(run_dir).config
    before = set(run_dir.rglob("*")) if existed else set()
    saved_config = config.read_bytes() if config.is_file() else None
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            for path in sorted(set(run_dir.rglob("*")) - before, key=lambda p: -len(p.parts)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if saved_config is not None:
                config.write_bytes(saved_config)
        raise
    finally:
        with contextlib.suppress(OSError):
            (run_dir / "slurm" / "%j").rmdir()


def main(argv: list[str] | None = None) -> int:
    return run_cli("cluster/submit.py", build_parser(), submit, argv)


if __name__ == "__main__":
    sys.exit(main())
