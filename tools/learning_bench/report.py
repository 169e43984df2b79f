"""The benchmark's report: the markdown table (mean ± std over seeds), results.md and
results.json."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from learning_bench.data import DataSpec
from learning_bench.variants import VARIANTS, Recipe, Width

# --- report ----------------------------------------------------------------------------------


def _mean_std(xs: list[float | None], digits: int = 1) -> str:
    """`mean ± std` over seeds (sample std), or the one value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def _objective(objective: str, warmup: int, recipe: Recipe) -> str:
    """How the table names a run's objective."""
    first = f"mean {warmup} ep, then " if warmup else ""
    if objective in ("official", "guarded"):
        guard = ", collapse guard" if objective == "guarded" else ""
        return ("mean" if warmup >= recipe.epochs else f"{first}hardest") + guard
    return first + {"sel": "selective", "nce": "InfoNCE"}.get(objective, objective)


def table(results: list[dict], recipe: Recipe) -> str:
    """One row per (variant, dropout), mean ± std over its seeds."""
    lines = [
        "| variant | impl | K | similarity | dropout | noise | objective | test RSUM | R@1 i2t "
        "| R@1 t2i | train-subset RSUM | last-epoch i2t / t2i | last-epoch sim_std "
        "| fallback steps | train min | eval min | seeds |",
        "|---|---|---:|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for res in results:
        groups.setdefault((res["variant"], res["dropout"], res.get("noise", 0.0)), []).append(res)
    for (name, dropout, noise), runs in groups.items():
        v, wu = VARIANTS[name], VARIANTS[name].warmup_epochs(recipe)
        keys = {key for x in runs for key in x if key not in ("test", "train")}
        col = {key: [x.get(key) for x in runs] for key in keys}
        test = {key: [x["test"][key] for x in runs] for key in ("rsum", "i2t_r1", "t2i_r1")}
        train_rsum = [x["train"]["rsum"] for x in runs]
        cells = [
            name,
            v.impl,
            str(v.k),
            v.similarity,
            dropout,
            f"{100 * noise:.0f}%",
            _objective(v.objective, wu, recipe),
            _mean_std(test["rsum"]),
            _mean_std(test["i2t_r1"]),
            _mean_std(test["t2i_r1"]),
            _mean_std(train_rsum),
            f"{_mean_std(col['final_i2t_loss'], 3)} / {_mean_std(col['final_t2i_loss'], 3)}",
            _mean_std(col.get("final_sim_std", []), 4),
            _mean_std(col.get("fallback_steps", []), 0)
            + (
                f" (stopped: {sum(bool(x) for x in col['stopped'])})"
                if any(col.get("stopped", []))
                else ""
            ),
            _mean_std(col["train_min"]),
            _mean_std(col["eval_min"]),
            ",".join(str(x) for x in col["seed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(out: Path, spec: DataSpec, recipe: Recipe, width: Width, results: list[dict]) -> str:
    text = (
        f"data: {asdict(spec)}\nrecipe: {asdict(recipe)}\nwidth: {asdict(width)}\n\n"
        + table(results, recipe)
        + "\n"
    )
    (out / "results.md").write_text(text)
    payload = {"spec": asdict(spec), "recipe": asdict(recipe), "width": asdict(width)}
    (out / "results.json").write_text(json.dumps({**payload, "runs": results}, indent=1))
    return text


# --- the objective tables (issue: collapse, noisy pairs) ---------------------------------------

OBJECTIVE_ROWS = {
    "official": "official: hardest, 1 mean epoch first",
    "sel": "**selective** (the default)",
    "nce": "InfoNCE",
    "hnnce": "InfoNCE + HN-NCE (beta 0.5)",
    "rnce": "robust InfoNCE (q 0.5)",
    "hnrnce": "robust InfoNCE + HN-NCE",
    "rsel": "robust selective (q 0.5)",
}
"""Objective -> its row label in the collected tables; the last three appear where measured."""

_TABLE_OBJECTIVES = ("official", "sel", "nce", "hnnce")
"""The rows the issue's table always has, measured or not."""


def _objective_of(name: str) -> tuple[int, str] | None:
    """(K, objective) of a setdiv variant in the objective tables, or None."""
    v = VARIANTS[name]
    if (
        v.impl != "setdiv"
        or v.warmup is not None
        or v.overrides
        or v.similarity != "smooth_chamfer"
    ):
        return None
    return v.k, v.objective


def _cell(runs: list[dict]) -> tuple[str, float | None]:
    xs = [r["test"]["rsum"] for r in runs]
    return _mean_std(xs), (statistics.fmean(xs) if xs else None)


def objective_tables(results: list[dict]) -> str:
    """Test RSUM by objective x K: against the share of noisy pairs (dropout off), with the
    share of the clean RSUM each keeps; and with the recipe's dropouts at 0% noise."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        key = _objective_of(r["variant"])
        if key is not None:
            cells.setdefault((*key, r["dropout"], r.get("noise", 0.0)), []).append(r)
    lines = [
        "| K | objective | 0% noise | 20% noise | kept | 50% noise | kept | the recipe's dropouts "
        "| kept | seeds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in (4, 1):
        for obj, label in OBJECTIVE_ROWS.items():
            if obj not in _TABLE_OBJECTIVES and not any(key[:2] == (k, obj) for key in cells):
                continue
            clean, clean_mean = _cell(cells.get((k, obj, "off", 0.0), []))
            row = [str(k), label, clean]
            for noise in (0.2, 0.5):
                text, mean = _cell(cells.get((k, obj, "off", noise), []))
                row += [text, f"{100 * mean / clean_mean:.0f}%" if mean and clean_mean else "-"]
            text, mean = _cell(cells.get((k, obj, "on", 0.0), []))
            row += [text, f"{100 * mean / clean_mean:.0f}%" if mean and clean_mean else "-"]
            seeds = sorted(
                {r["seed"] for key, rs in cells.items() if key[:2] == (k, obj) for r in rs}
            )
            row.append(",".join(map(str, seeds)))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def collect(dirs: list[Path], out: Path) -> str:
    """Merge the results.json of several runs of the benchmark: the per-run table and the
    objective tables, written to OUT/results.md and OUT/results.json."""
    results, payload = [], {}
    for d in dirs:
        blob = json.loads((d / "results.json").read_text())
        payload = {k: blob[k] for k in ("spec", "recipe", "width")}
        results += blob["runs"]
    recipe = Recipe(**payload["recipe"])
    text = table(results, recipe) + "\n\n" + objective_tables(results) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({**payload, "runs": results}, indent=1))
    return text
