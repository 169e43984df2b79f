"""The benchmark's command line: which runs, then data, runs and report."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from learning_bench.data import DataSpec, prepare_data
from learning_bench.reference import _check_reference, run_reference
from learning_bench.report import _write, collect
from learning_bench.runner import diagnose, run_setdiv
from learning_bench.variants import DEFAULT_TABLE, VARIANTS, Recipe, Width

# --- main ------------------------------------------------------------------------------------


def parse_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(variant, dropout) pairs: `--runs v:d,...`, or `--variants` x `--dropout`."""
    if args.variants:
        pairs = [(v, d) for v in args.variants.split(",") for d in args.dropout.split(",")]
    else:
        pairs = [tuple(x.split(":")) for x in (args.runs or DEFAULT_TABLE).split(",")]
    for v, d in pairs:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
        if d not in ("on", "off"):
            raise SystemExit(f"dropout must be on or off, got {d!r}")
    return pairs


def out_dir(args: argparse.Namespace, work: Path) -> Path:
    return Path(args.out) if args.out else work / "report"


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", default="/tmp/setdiv_bench_learning", help="data, shards and runs")
    p.add_argument("--out", default=None, help="results.md / results.json (default WORK/report)")
    p.add_argument("--runs", default=None, help=f"variant:dropout list (default {DEFAULT_TABLE})")
    p.add_argument("--variants", default=None, help=f"instead of --runs: some of {list(VARIANTS)}")
    p.add_argument("--dropout", default="off", help="with --variants: off, on or off,on")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument(
        "--noise",
        default="0",
        help="comma-separated shares of training captions replaced by other images' (setdiv "
        "runs: data.caption_noise), e.g. 0,0.2,0.5",
    )
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 6)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=None, help="mean-negative epochs (default 1)")
    p.add_argument("--train-images", type=int, default=None, help="train split size (default 4000)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: on a shared 2-core machine more threads "
        "oversubscribe the cores and run up to 10x slower; the data worker takes the other)",
    )
    p.add_argument("--prepare", action="store_true", help="only generate and convert the data")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, k4 + ref_k4 (smoke)")
    p.add_argument(
        "--collect",
        nargs="+",
        default=None,
        metavar="OUT_DIR",
        help="instead of training: merge the results.json of earlier runs (their --out) into "
        "one report with the objective tables (noisy pairs, dropouts), written to --out",
    )
    p.add_argument(
        "--diagnose",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="instead of training: the similarity spread (collapse diagnostic) of finished runs",
    )
    return p.parse_args()


def main() -> int:
    args = _arguments()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # inherited by the setdiv processes
        os.environ[var] = str(args.threads)
    torch.set_num_threads(args.threads)
    _check_reference()
    spec, recipe = DataSpec(), Recipe()
    if args.quick:
        spec, recipe = DataSpec(train=640, dev=200, test=200, train_eval=200), Recipe(epochs=1)
        if not (args.runs or args.variants):
            args.runs = "k4:off,ref_k4:off"
    for flag, key in (("epochs", "epochs"), ("lr", "lr"), ("warmup", "warmup")):
        if getattr(args, flag) is not None:
            setattr(recipe, key, getattr(args, flag))
    if args.train_images:
        spec = replace(spec, train=args.train_images)
    work = Path(args.work)
    if args.collect:
        print(collect([Path(d) for d in args.collect], out_dir(args, work)))
        return 0
    if args.diagnose:
        print(diagnose([Path(d) for d in args.diagnose], work / "data" / "shards"))
        return 0
    pairs, seeds = parse_runs(args), [int(s) for s in args.seeds.split(",")]
    noises = [float(x) for x in args.noise.split(",")]
    out = out_dir(args, work)
    out.mkdir(parents=True, exist_ok=True)
    raw, shards, vocab = prepare_data(spec, work)
    if args.prepare:
        return 0
    results, width, t0 = [], Width(), time.perf_counter()
    runs = [(n, d, x, s) for n, d in pairs for x in noises for s in seeds]
    for name, dropout, noise, seed in runs:
        v = VARIANTS[name]
        if v.impl != "setdiv" and noise:
            raise SystemExit(f"{name}: the reference reads clean data only (--noise 0)")
        tag = f"_noise{round(100 * noise)}" if noise else ""
        rd = work / "runs" / f"{name}_drop{dropout}{tag}_seed{seed}"
        print(f"run {rd.name} ...", flush=True)
        if v.impl == "setdiv":
            res = run_setdiv(v, dropout == "on", seed, width, recipe, shards, vocab, rd, noise)
        else:
            res = run_reference(v, dropout == "on", seed, width, recipe, raw, vocab)
        res.update(variant=name, dropout=dropout, seed=seed, impl=v.impl, noise=noise)
        print(
            f"  test RSUM {res['test']['rsum']:.1f} (train subset {res['train']['rsum']:.1f})"
            f", train {res['train_min']:.1f} min, eval {res['eval_min']:.1f} min",
            flush=True,
        )
        results.append(res)
        _write(out, spec, recipe, width, results)
    print(_write(out, spec, recipe, width, results))
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}/results.md, results.json")
    return 0
