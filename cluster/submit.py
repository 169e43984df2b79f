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
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import _make_sbatch_string  # pinned submitit==1.5.4; no public API

from cluster.jobs import TrainJob
from setdiv import config as config_lib
from setdiv.errors import UserError
from setdiv.train import checkpoint, rundir

__all__ = ["build_parser", "executor_parameters", "main", "sbatch_script"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
        help="timeouts after which the job is not requeued again (preemptions do not count)",
    )
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/NAME-DATE)")
    p.add_argument("--job-name", default=None, help="job name (default: setdiv-CONFIG)")
    p.add_argument("--resume", action="store_true", help="continue the run already in --run-dir")
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
            if key.endswith("_shards"):
                ShardSet.resolve(value)
            elif not Path(value).exists():
                raise FileNotFoundError(value)
        except (FileNotFoundError, UserError) as exc:
            print(
                f"warning: config key '{key}': {exc} on this machine "
                "(fine if it exists on the cluster's filesystem)",
                file=sys.stderr,
            )


def _run_dir(args: argparse.Namespace, name: str) -> Path:
    run_dir = Path(args.run_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    holds_run = checkpoint.latest_tag(run_dir) is not None
    if holds_run and not args.resume:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it")
    if args.resume and not holds_run:
        raise UserError(f"--resume: {run_dir} holds no checkpoint to continue from")
    return run_dir


def _check(args: argparse.Namespace) -> None:
    if args.nodes < 1 or args.cpus_per_task < 1:
        raise UserError("--nodes and --cpus-per-task must be >= 1")
    if args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        raise UserError("--gpus-per-node must be >= 0 and --tasks-per-node >= 1")
    if args.time <= 0 or args.signal_delay < 0 or args.max_requeues < 0:
        raise UserError("--time must be > 0, --signal-delay and --max-requeues >= 0")
    if args.local and args.nodes > 1:
        raise UserError("--local runs on this machine: --nodes must be 1")


def _executor(args: argparse.Namespace, params: dict[str, Any], folder: Path) -> Any:
    if args.local:
        ex = submitit.LocalExecutor(folder, max_num_timeout=args.max_requeues)
        local = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        local |= {"timeout_min": args.time, "signal_delay_s": args.signal_delay}
        ex.update_parameters(**local)
        return ex
    if shutil.which("sbatch") is None:
        raise UserError(
            "SLURM was asked for but 'sbatch' is not on PATH: submit from a SLURM login node, "
            "or pass --local to run on this machine"
        )
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
    run_dir = _run_dir(args, name)
    if args.resume:  # before the run's config.yaml is rewritten below
        rundir.check_resume_config(cfg, run_dir)
    params = executor_parameters(args)
    folder = run_dir / "slurm" / "%j"
    job = TrainJob(str(run_dir / "config.yaml"), str(run_dir), "latest" if args.resume else None)
    if args.dry_run:
        print(sbatch_script(params, folder))
        print(f"# every task runs: {job.command()}")
        print(f"# requeued (timeout / preemption) as: {job.checkpoint().function.command()}")
        print(f"# resolved config ({job.config}):")
        print(config_lib.to_yaml(cfg))
        return 0
    executor = _executor(args, params, folder)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, job.config)
    with submitit.helpers.clean_env():  # no SLURM_* / MASTER_* of a job we may be inside
        submitted = executor.submit(job)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        return submit(args)
    except (UserError, FileNotFoundError) as exc:
        print(f"cluster/submit.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
