"""Seed ensembles: one training run per seed, each evaluated, then their similarity matrices
averaged (what tools/ensemble_eval.py does), single models and the ensemble side by side.

    python cluster/ensemble.py configs/roi_bigru.yaml --seeds 0,1,2 \\
        --test-data 'shards/coco_butd/testall-*.tar' --protocol coco \\
        --backend ray --gpus-per-run 1 --storage /shared/ensembles

Runs go to STORAGE/NAME/runs/seed<S>/ (trained to train.epochs, no early stopping; a crashed
run is retried --max-failures times and resumes from its newest checkpoint), each evaluation's
sims.npy to runs/seed<S>/eval/ on that shared storage (paths, not matrices, travel through
Ray), the ensemble to STORAGE/NAME/ensemble/ and every number to STORAGE/NAME/ensemble.json.
Re-running the same command resumes: finished runs are not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from setdiv import config as config_lib
from setdiv import errors
from setdiv.distributed.jobs import add_nproc_argument, child_env, setdiv_command
from setdiv.distributed.ray_session import ray_session
from setdiv.errors import UserError, check_at_least
from setdiv_cluster.cli import INTERRUPTED, run_cli
from setdiv_cluster.jobs import ChildFailedError, run_child
from setdiv_cluster.ray_cluster import add_arguments as add_ray_arguments
from setdiv_cluster.ray_cluster import resource_bounds
from setdiv_cluster.trials import (
    USER_ERROR_MARK,
    NonFiniteTrialError,
    TrialSpec,
    TrialUserError,
    run_dir_for,
    run_training,
    trial_tuner,
)

__all__ = ["build_parser", "evaluate_run", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = errors.ArgumentParser(
        prog="cluster/ensemble.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config (a delta over the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides shared by every seed")
    p.add_argument("--seeds", required=True, help="comma list of train.seed values, e.g. 0,1,2")
    p.add_argument("--test-data", required=True, help="test shards (brace pattern or glob)")
    p.add_argument("--protocol", choices=get_args(config_lib.Protocol), required=True)
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument(
        "--tag",
        default=None,
        help="checkpoint to evaluate (default: best with val data, else latest)",
    )
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed run")
    add_nproc_argument(p, "ranks per training run", deprecated=["--nproc-per-run"])
    p.add_argument("--cpus-per-run", type=int, default=1)
    p.add_argument("--gpus-per-run", type=int, default=0)
    p.add_argument("--storage", default="ensembles", help="where runs go (shared FS)")
    p.add_argument("--name", default=None, help="ensemble name (default: CONFIG-ensemble)")
    add_ray_arguments(p)
    return p


def evaluate_run(
    run_dir: str, test_data: str, protocol: str, tag: str, nproc: int, cwd: str
) -> str:
    """Export a run's checkpoint `tag` and evaluate it on the test shards; returns the path
    of its sims.npy (RUN/eval/). Both steps run as children in their own session."""
    run = Path(run_dir)
    export = setdiv_command("export", str(run), "--tag", tag, "--out", str(run / "export"))
    evaluate = setdiv_command(
        "eval", str(run / "export"), "--data", test_data, "--protocol", protocol,
        "--out", str(run / "eval"), "--nproc", str(nproc),
    )  # fmt: skip
    for name, cmd in (("export", export), ("eval", evaluate)):
        code = run_child(cmd, run / "eval.log", child_env(threads=1), cwd=cwd)
        if code != 0:
            tail = (run / "eval.log").read_text(errors="replace").splitlines()[-15:]
            raise ChildFailedError(
                f"setdiv {name} of {run} exited with {code}:\n" + "\n".join(tail)
            )
    return str(run / "eval" / "sims.npy")


def _train_local(spec: TrialSpec, seeds: Sequence[int], max_failures: int) -> None:
    for seed in seeds:
        values = {"train.seed": seed}
        run_dir = run_dir_for(spec, values, "")
        for attempt in range(max_failures + 1):
            try:
                run_training(spec, values, run_dir)
                break
            except (NonFiniteTrialError, TrialUserError):
                raise  # a retry would end the same way
            except ChildFailedError as exc:
                if attempt == max_failures:
                    raise
                print(
                    f"seed {seed}: attempt {attempt + 1} failed, resuming: {exc}", file=sys.stderr
                )


def _train_ray(spec: TrialSpec, seeds: Sequence[int], args: argparse.Namespace, exp: Path) -> None:
    from ray import tune

    tuner = trial_tuner(
        spec,
        exp,
        {"cpu": args.cpus_per_run, "gpu": args.gpus_per_run},
        args.max_failures,
        param_space={"train.seed": tune.grid_search(list(seeds))},
        tune_config=tune.TuneConfig(reuse_actors=False),  # FIFO: no early stopping
        what="ensemble's training",
    )
    tuner.fit()
    for seed in seeds:
        refused = run_dir_for(spec, {"train.seed": seed}, "") / USER_ERROR_MARK
        if refused.is_file():
            raise UserError(f"seed {seed}: {refused.read_text().strip()}")
    states = {t.config["train.seed"]: t.status for t in tune.ExperimentAnalysis(str(exp)).trials}
    failed = [s for s, status in states.items() if status == "ERROR"]
    if failed:
        raise ChildFailedError(
            f"training failed for seed(s) {failed}: see {spec.runs_dir}/seed*/train.log"
        )
    if any(status != "TERMINATED" for status in states.values()):
        raise KeyboardInterrupt


def _evaluate(args: argparse.Namespace, run_dirs: list[str], tag: str) -> list[str]:
    job = (args.test_data, args.protocol, tag, args.nproc, os.getcwd())
    if args.backend == "local":
        return [evaluate_run(r, *job) for r in run_dirs]
    import ray

    remote = ray.remote(
        num_cpus=args.cpus_per_run,
        num_gpus=args.gpus_per_run,
        max_retries=args.max_failures,
        retry_exceptions=True,
    )(evaluate_run)
    return ray.get([remote.remote(r, *job) for r in run_dirs])


def _check(args: argparse.Namespace) -> None:
    """Every count, before the config is read or Ray starts."""
    check_at_least(
        {
            "--max-failures": (args.max_failures, 0),
            "--cpus-per-run": (args.cpus_per_run, 1),
            "--gpus-per-run": (args.gpus_per_run, 0),
            **resource_bounds(args),
        }
    )


def _check_test_data(cfg: config_lib.Config, pattern: str) -> None:
    """Resolve the test shards as `setdiv eval` will (the config's `data.format`), before any
    seed trains: a pattern matching nothing is a UserError naming it."""
    from setdiv.data.loaders import resolve_shards  # (torch)

    try:
        resolve_shards(cfg.data, pattern)
    except (FileNotFoundError, UserError) as exc:
        raise UserError(f"--test-data {pattern!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected a comma list of integers") from None
    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise UserError("--seeds: an ensemble needs at least two different seeds")
    cfg = config_lib.load([args.config], args.overrides)
    _check_test_data(cfg, args.test_data)
    tag = args.tag or ("best" if cfg.data.val_shards else "latest")
    exp = Path(args.storage).resolve() / (args.name or f"{Path(args.config).stem}-ensemble")
    spec = TrialSpec(
        config=str(Path(args.config).resolve()),
        overrides=tuple(args.overrides),
        runs_dir=str(exp / "runs"),
        cwd=os.getcwd(),
        nproc=args.nproc,
        threads=max(args.cpus_per_run // args.nproc, 1),
        epochs=cfg.train.epochs,
        run_name_key="train.seed",
    )
    run_dirs = [str(run_dir_for(spec, {"train.seed": s}, "")) for s in seeds]
    try:
        if args.backend == "local":
            _train_local(spec, seeds, args.max_failures)
            sims = _evaluate(args, run_dirs, tag)
        else:
            with ray_session(args.address, args.num_cpus, args.num_gpus):
                _train_ray(spec, seeds, args, exp)
                sims = _evaluate(args, run_dirs, tag)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return INTERRUPTED
    from setdiv.eval.ensemble import ensemble  # (torch: imported once there is work)
    from setdiv.eval.evaluator import format_table, write_result

    names = [f"seed{s}" for s in seeds]
    rows, result = ensemble(sims, args.protocol, names=names)
    write_result(result, exp / "ensemble")
    print(
        format_table(rows, title=f"{len(seeds)} seeds, protocol {args.protocol}, {args.test_data}")
    )
    summary = {
        "protocol": args.protocol,
        "test_data": args.test_data,
        "checkpoint_tag": tag,
        "members": dict(zip(names, sims, strict=True)),
        "metrics": rows,
        "ensemble_sims": str(exp / "ensemble" / "sims.npy"),
    }
    (exp / "ensemble.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {exp / 'ensemble.json'} and {exp / 'ensemble'}/")
    print(
        f"(the same as: python tools/ensemble_eval.py {' '.join(sims)} --protocol {args.protocol})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("cluster/ensemble.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
