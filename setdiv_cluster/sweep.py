"""Hyper-parameter sweeps with Ray Tune: every trial is one `setdiv train` run over dotted
config keys, scored by its per-epoch validation RSUM (`val_rsum`).

    python cluster/sweep.py configs/roi_bigru.yaml data.val_shards='shards/dev-*.tar' \\
        --space model.image_set.num_embeds=1,2,4,8 --space model.image_set.num_iters=int:1:6 \\
        --space similarity.alpha=log:4:64 \\
        --tie model.text_set.num_embeds=model.image_set.num_embeds \\
        --samples 16 --gpus-per-trial 1 --storage /shared/sweeps --name k_t_alpha

--space KEY=SPEC (repeatable):
    KEY=v1,v2,v3        a choice among the values (each sample draws one); one value: fixed
    KEY=grid:v1,v2      every value, each --samples times (a grid search)
    KEY=int:LO:HI       an integer, uniform in [LO, HI] (both ends included)
    KEY=uniform:LO:HI   a float, uniform in [LO, HI]
    KEY=log:LO:HI       a float, log-uniform in [LO, HI]
--tie KEY=SOURCE: KEY takes SOURCE's sampled value (e.g. the text set size follows the image
set size), unless KEY is sampled itself.

ASHA (default) stops poor trials after each epoch and the trial's whole process group with
them; a crashed trial is retried (--max-failures) and resumes from its newest checkpoint; a
trial that diverges (non-finite losses or val_rsum) fails and is never the best. Re-running the
same command on an existing sweep directory resumes it. At the end: a table (printed and
STORAGE/NAME/results.csv) and the best configuration as a YAML delta (STORAGE/NAME/best.yaml)
that `setdiv train` and cluster/submit.py accept.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from setdiv import config as config_lib
from setdiv import errors
from setdiv.distributed.jobs import add_nproc_argument
from setdiv.distributed.ray_session import ray_session
from setdiv.errors import UserError, check_at_least
from setdiv.paths import RunFiles
from setdiv_cluster.cli import INTERRUPTED, run_cli
from setdiv_cluster.ray_cluster import add_arguments as add_ray_arguments
from setdiv_cluster.ray_cluster import resource_bounds
from setdiv_cluster.trials import (
    NONFINITE_MARK,
    USER_ERROR_MARK,
    TrialSpec,
    overrides_for,
    trial_node,
    trial_tuner,
    val_records,
)

__all__ = ["Row", "build_parser", "main", "parse_space", "results_table", "write_best"]


def build_parser() -> argparse.ArgumentParser:
    p = errors.ArgumentParser(
        prog="cluster/sweep.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="base YAML config (a delta over the defaults)")
    p.add_argument("overrides", nargs="*", help="fixed dotted overrides, e.g. train.epochs=20")
    p.add_argument("--space", action="append", default=[], required=True, help="KEY=SPEC")
    p.add_argument("--tie", action="append", default=[], help="KEY=SOURCE")
    p.add_argument("--samples", type=int, default=8, help="trials (grid: repeats of the grid)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    p.add_argument("--grace-epochs", type=int, default=1, help="ASHA: epochs before a stop")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1 of this many")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial")
    p.add_argument("--cpus-per-trial", type=int, default=1)
    p.add_argument("--gpus-per-trial", type=int, default=0)
    add_nproc_argument(p, "ranks per trial", deprecated=["--nproc-per-trial"])
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling of the space")
    p.add_argument("--storage", default="sweeps", help="sweep directories live here (shared FS)")
    p.add_argument("--name", default=None, help="sweep name (default: CONFIG-sweep)")
    add_ray_arguments(p)
    return p


# --- the search space --------------------------------------------------------------------------


def _scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


@dataclass
class Dimension:
    key: str
    kind: str
    """choice | grid | int | uniform | log"""
    values: list[Any] = field(default_factory=list)
    """choice / grid: the values; ranges: [LO, HI]."""

    def domain(self) -> Any:
        from ray import tune

        lo, hi = (self.values + [None, None])[:2]
        return {
            "choice": lambda: tune.choice(self.values),
            "grid": lambda: tune.grid_search(self.values),
            "int": lambda: tune.randint(lo, hi + 1),
            "uniform": lambda: tune.uniform(lo, hi),
            "log": lambda: tune.loguniform(lo, hi),
        }[self.kind]()


def parse_space(spec: str) -> Dimension:
    """One --space argument: `model.image_set.num_embeds=1,2,4`, `similarity.alpha=log:4:64`."""
    key, sep, body = spec.partition("=")
    if not sep or not key or not body:
        raise UserError(f"--space {spec!r}: expected KEY=SPEC")
    kind, colon, rest = body.partition(":")
    if colon and kind in ("int", "uniform", "log"):
        parts = rest.split(":")
        cast = int if kind == "int" else float
        try:
            lo, hi = (cast(x) for x in parts)
        except ValueError:
            raise UserError(f"--space {spec!r}: expected {kind}:LO:HI") from None
        if not lo < hi or (kind == "log" and lo <= 0):
            raise UserError(f"--space {spec!r}: need LO < HI" + (" and LO > 0" * (kind == "log")))
        return Dimension(key, kind, [lo, hi])
    if colon and kind == "grid":
        return Dimension(key, "grid", [_scalar(v) for v in rest.split(",")])
    return Dimension(key, "choice", [_scalar(v) for v in body.split(",")])


def _validate(args: argparse.Namespace, dims: list[Dimension], ties: list[tuple[str, str]]) -> int:
    """Every sampled value must fit the config schema; returns train.epochs."""
    base = config_lib.load([args.config], args.overrides)
    if base.data.val_shards is None:
        raise UserError("a sweep scores trials by val_rsum: set data.val_shards")
    for dim in dims:
        for value in dim.values:
            config_lib.load([args.config], [*args.overrides, f"{dim.key}={json.dumps(value)}"])
    sampled = {d.key: d for d in dims}
    for key, source in ties:
        if source not in sampled:
            raise UserError(f"--tie {key}={source}: {source} is not in the --space")
        if key in sampled:
            print(f"note: --tie {key}={source} ignored, {key} is sampled itself", file=sys.stderr)
        for value in sampled[source].values:
            config_lib.load([args.config], [*args.overrides, f"{key}={json.dumps(value)}"])
    return base.train.epochs


# --- the results -----------------------------------------------------------------------------


@dataclass
class Row:
    trial_id: str
    values: dict[str, Any]
    best: float
    last: float
    epochs: int
    status: str
    """completed | stopped early | non-finite | user error | error | unfinished"""
    run_dir: str
    node: str = ""
    """Where the trial ran (its Slurm node name, else the host)."""


def _row(trial: Any, runs_dir: Path, ties: tuple[tuple[str, str], ...], epochs: int) -> Row:
    """A trial's line of the table, from Tune's record of it and its run's metrics.jsonl."""
    run_dir = runs_dir / trial.trial_id
    values = overrides_for(trial.config, ties)
    scores = [r["val_rsum"] for r in val_records(RunFiles(run_dir).metrics)]
    finite = [s for s in scores if math.isfinite(s)]
    if (run_dir / NONFINITE_MARK).is_file() or len(finite) < len(scores):
        status = "non-finite"
    elif (run_dir / USER_ERROR_MARK).is_file():
        status = "user error"
    elif trial.status == "ERROR":
        status = "error"
    elif trial.status != "TERMINATED":  # PENDING / RUNNING / PAUSED when interrupted
        status = "unfinished"
    else:
        status = "completed" if len(scores) >= epochs else "stopped early"
    last = scores[-1] if scores else math.nan
    best = max(finite, default=math.nan)
    return Row(
        trial.trial_id, values, best, last, len(scores), status, str(run_dir), trial_node(run_dir)
    )


def _columns(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    keys = sorted({k for r in rows for k in r.values})
    head = ["trial_id", *keys, "best_val_rsum", "last_val_rsum", "epochs", "status"]
    head += ["node", "run_dir"]
    body = [
        [r.trial_id, *(r.values.get(k, "") for k in keys), r.best, r.last, r.epochs, r.status]
        + [r.node, r.run_dir]
        for r in rows
    ]
    return head, body


def results_table(rows: list[Row]) -> str:
    """The CSV's columns but the run directory, aligned for a terminal."""
    head, body = _columns(rows)
    scores = {head.index("best_val_rsum"), head.index("last_val_rsum")}
    cells = [head[:-1]] + [
        [f"{x:.2f}" if i in scores else str(x) for i, x in enumerate(line[:-1])] for line in body
    ]
    widths = [max(len(x) for x in col) for col in zip(*cells, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)) for c in cells)


def write_csv(rows: list[Row], path: Path) -> None:
    head, body = _columns(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([head, *body])


def best_row(rows: list[Row]) -> Row | None:
    """The best finished trial by its best val_rsum; failed and unfinished trials never win."""
    ok = [r for r in rows if r.status in ("completed", "stopped early") and math.isfinite(r.best)]
    return max(ok, key=lambda r: r.best, default=None)


def write_best(config: str, overrides: list[str], row: Row, path: Path) -> None:
    """The base YAML + fixed overrides + the trial's values, as one YAML delta."""
    dotlist = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in row.values.items())]
    delta = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(dotlist))
    header = (
        f"# best trial {row.trial_id}: val_rsum {row.best:.2f} "
        f"({row.status}, {row.epochs} epochs)\n"
        f"# run: {row.run_dir}\n# base: {config} {' '.join(overrides)}\n"
    )
    path.write_text(header + OmegaConf.to_yaml(delta))
    config_lib.load([path])  # what we hand out must load


# --- the driver --------------------------------------------------------------------------------


def _tuner(
    args: argparse.Namespace, dims: list[Dimension], spec: TrialSpec, exp_dir: Path, epochs: int
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = None
    if args.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=args.grace_epochs,
            reduction_factor=args.reduction_factor,
        )
    return trial_tuner(
        spec,
        exp_dir,
        {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial},
        args.max_failures,
        param_space={d.key: d.domain() for d in dims},
        tune_config=tune.TuneConfig(
            metric="val_rsum",
            mode="max",
            num_samples=args.samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=args.seed),
            reuse_actors=False,
        ),
        what="sweep",
    )


def _same_command(args: argparse.Namespace, exp_dir: Path) -> None:
    """A sweep directory belongs to one command: resuming with another would mix trials."""
    command = {k: v for k, v in vars(args).items() if k not in ("address", "num_cpus", "num_gpus")}
    saved = exp_dir / "sweep.json"
    if saved.is_file():
        before = json.loads(saved.read_text())
        if before != command:
            changed = sorted(k for k in command if before.get(k) != command[k])
            raise UserError(
                f"{exp_dir} holds a sweep started with other arguments "
                f"({', '.join(changed)}): re-run it as it was, or use another --name"
            )
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(command, indent=1))


def _check(args: argparse.Namespace) -> None:
    """Every count and range, before the config is read or Ray starts."""
    check_at_least(
        {
            "--samples": (args.samples, 1),
            "--cpus-per-trial": (args.cpus_per_trial, 1),
            "--gpus-per-trial": (args.gpus_per_trial, 0),
            "--max-failures": (args.max_failures, 0),
            "--grace-epochs": (args.grace_epochs, 1),
            "--reduction-factor": (args.reduction_factor, 2),
            **resource_bounds(args),
        }
    )


def sweep(args: argparse.Namespace) -> int:
    _check(args)
    dims = [parse_space(s) for s in args.space]
    ties = [tuple(t.split("=", 1)) for t in args.tie]
    if any(len(t) != 2 for t in ties):
        raise UserError("--tie expects KEY=SOURCE")
    epochs = _validate(args, dims, ties)
    if args.scheduler == "asha" and args.grace_epochs > epochs:
        raise UserError(
            f"--grace-epochs {args.grace_epochs} exceeds train.epochs {epochs}: ASHA could "
            "never stop a trial"
        )
    args.config = str(Path(args.config).resolve())
    exp_dir = Path(args.storage).resolve() / (args.name or f"{Path(args.config).stem}-sweep")
    _same_command(args, exp_dir)
    spec = TrialSpec(
        config=args.config,
        overrides=tuple(args.overrides),
        runs_dir=str(exp_dir / "runs"),
        cwd=os.getcwd(),
        ties=tuple(ties),
        nproc=args.nproc,
        threads=max(args.cpus_per_trial // args.nproc, 1),
        epochs=epochs,
    )
    import ray
    from ray import tune

    with ray_session(args.address, args.num_cpus, args.num_gpus):
        if args.gpus_per_trial == 0 and ray.cluster_resources().get("GPU", 0) > 0:
            print("warning: the Ray cluster has GPUs but --gpus-per-trial is 0", file=sys.stderr)
        _tuner(args, dims, spec, exp_dir, epochs).fit()
    trials = tune.ExperimentAnalysis(str(exp_dir)).trials  # every trial, started or not
    rows = [_row(t, exp_dir / "runs", spec.ties, epochs) for t in trials]
    print(results_table(rows))
    write_csv(rows, exp_dir / "results.csv")
    print(f"wrote {exp_dir / 'results.csv'}")
    best = best_row(rows)
    if best is not None:
        write_best(args.config, args.overrides, best, exp_dir / "best.yaml")
        print(f"best: trial {best.trial_id}, val_rsum {best.best:.2f} -> {exp_dir / 'best.yaml'}")
    refused = [r for r in rows if r.status == "user error"]
    if refused:
        why = (Path(refused[0].run_dir) / USER_ERROR_MARK).read_text().strip()
        raise UserError(
            f"{len(refused)} trial(s) refused by setdiv train (not retried), e.g. {why}"
        )
    unfinished = sum(r.status == "unfinished" for r in rows)
    if unfinished:
        print(
            f"sweep interrupted with {unfinished} trial(s) unfinished: "
            "re-run the same command to resume it"
        )
        return INTERRUPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("cluster/sweep.py", build_parser(), sweep, argv)


if __name__ == "__main__":
    sys.exit(main())
