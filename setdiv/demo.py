"""`setdiv demo`: the whole system on one CPU in minutes.

Generates the built-in ambiguous synthetic dataset as shards, trains the set model (K = 4,
smooth-Chamfer) and the single-embedding baseline (K = 1) through the DeepSpeed trainer (side
by side: the baseline as a `setdiv train` job of its own in a second process, the machine's
cores split between the two), exports both, evaluates both with the evaluator on the test
split, prints the two side by side, and writes `attention.png` (slot attention of the K = 4
model) and `curves.png` (training loss, similarity spread and validation RSUM of both) into
the output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from setdiv import config as config_lib  # noqa: E402
from setdiv.data.convert import synthetic_samples  # noqa: E402
from setdiv.data.shards import ShardIndex, index_path, write_shards  # noqa: E402
from setdiv.data.vocab import Vocab  # noqa: E402
from setdiv.distributed.jobs import child_env, setdiv_command  # noqa: E402
from setdiv.eval.evaluator import format_table, full_set_key, write_result  # noqa: E402
from setdiv.paths import RunFiles  # noqa: E402

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SIZES = {"full": (10000, 500, 1000, 250), "quick": (2000, 200, 500, 250)}
"""images in train / val / test, and shard size"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument(
        "--quick", action="store_true", help="a smaller dataset and 2 epochs (smoke test)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to both models")


def _make_data(out: Path, sizes: tuple[int, int, int, int], seed: int) -> Path:
    data = out / "data"
    n_train, n_val, n_test, shard = sizes
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        idx = index_path(data, split)
        if idx.is_file() and ShardIndex.load(idx).num_samples == n:
            continue  # already generated with these sizes
        write_shards(  # test images carry their picture: `setdiv serve` shows it
            synthetic_samples(split, n, seed, picture=split == "test"),
            data,
            split,
            "regions",
            f"synthetic:seed={seed}",
            shard,
        )
    vocab_path = out / "vocab.json"
    Vocab.build(c for s in synthetic_samples("train", n_train, seed) for c in s.captions).save(
        vocab_path
    )
    return vocab_path


def _curves(runs: dict[str, Path], out: Path, hardest_from_epoch: int | None) -> None:
    """Training loss, the batches' similarity spread (`sim_std`: near 0 is a collapse) and
    validation RSUM of each run, with the switch to hardest negatives marked."""
    fig, (ax_loss, ax_std, ax_val) = plt.subplots(1, 3, figsize=(14, 3.6))
    switch = None
    for name, run_dir in runs.items():
        records = [json.loads(line) for line in RunFiles(run_dir).metrics.read_text().splitlines()]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_rsum" in r]
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label=name)
        ax_std.plot(steps, [r.get("sim_std", float("nan")) for r in train], label=name)
        ax_val.plot([r["epoch"] for r in val], [r["val_rsum"] for r in val], marker="o", label=name)
        if hardest_from_epoch is not None and switch is None:
            # a validation record closes an epoch: its step is the last of that epoch
            switch = next((r["step"] for r in val if r["epoch"] == hardest_from_epoch), None)
    for ax in (ax_loss, ax_std):
        if switch is not None:
            ax.axvline(switch, color="grey", ls="--", lw=1, label="hardest negatives from here")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_std.set(xlabel="step", ylabel="std of the batch's similarities", title="similarity spread")
    ax_std.set_ylim(bottom=0)
    ax_val.set(xlabel="epoch", ylabel="RSUM", title="validation RSUM")
    for ax in (ax_loss, ax_std, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from setdiv.distributed import Job, process_group

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SIZES["quick" if args.quick else "full"]
    vocab_path = _make_data(out, sizes, seed=0)
    with process_group(Job.single()):  # whatever job this shell is in: the demo is one process
        rows, specialisation = _train_and_evaluate(args, out, vocab_path)
    minutes = (time.perf_counter() - t0) / 60
    print(
        format_table(
            rows, title=f"synthetic test split ({sizes[2]} images, {5 * sizes[2]} captions)"
        )
    )
    set_name, single_name = MODELS
    gain = rows[set_name]["rsum"] - rows[single_name]["rsum"]
    print(
        f"RSUM gain of the set model over the single embedding: {gain:+.1f}   ({minutes:.1f} min)"
    )
    print(
        "slot specialisation (mean over test images of each slot's largest attention weight): "
        + " ".join(f"{v:.3f}" for v in specialisation["slot_max_attention"])
        + f"   uniform attention: {specialisation['uniform']:.3f}"
    )
    print(
        f"wrote {out}/attention.png, {out}/specialisation.png, {out}/curves.png, "
        f"runs in {out}/run_k4 and {out}/run_k1"
    )
    summary = {"rows": rows, "specialisation": specialisation, "minutes": minutes}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


MODELS = {"set K=4 (smooth-Chamfer)": 4, "single K=1 (cosine)": 1}


@contextlib.contextmanager
def _cores_shared_by(jobs: int) -> Iterator[None]:
    """This process's ranks size their CPU threads for `jobs` jobs on the machine
    (`setdiv.distributed.jobs.cpu_threads`): the two trainings must not oversubscribe it."""
    before = os.environ.get("LOCAL_WORLD_SIZE")
    os.environ["LOCAL_WORLD_SIZE"] = str(jobs)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOCAL_WORLD_SIZE")
        else:
            os.environ["LOCAL_WORLD_SIZE"] = before


@contextlib.contextmanager
def _background_training(name: str, run_dir: Path, overrides: list[str]) -> Iterator[None]:
    """`setdiv train` of one model in a second process (a job of its own: no job variables of
    this shell passed on) while the body runs; its log goes to RUN_DIR.log. Waits for it at
    the end and raises, with the log's tail, if it failed; stops it if the body fails."""
    env = {**child_env(), "LOCAL_WORLD_SIZE": os.environ["LOCAL_WORLD_SIZE"]}
    logfile = run_dir.with_suffix(".log")
    cmd = setdiv_command("train", str(CONFIG), "--run-dir", str(run_dir))
    log.info("training %s -> %s in a second process (log: %s)", name, run_dir, logfile)
    with open(logfile, "w") as sink:
        proc = subprocess.Popen([*cmd, *overrides], stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            yield
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        if proc.wait() != 0:
            tail = logfile.read_text()[-2000:]
            raise RuntimeError(f"training {name} failed (exit {proc.returncode}):\n{tail}")


def _train_and_evaluate(
    args: argparse.Namespace, out: Path, vocab_path: Path
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Train, export and evaluate both models: rows of the comparison table, and the set
    model's slot specialisation (each slot's mean largest attention weight, and uniform's)."""
    from setdiv.distributed import pick_device
    from setdiv.eval.run import evaluate_export
    from setdiv.export import load_exported
    from setdiv.export_run import export_run
    from setdiv.train.trainer import Trainer

    base = [
        f"model.text.vocab_path={vocab_path}",
        "model.text.vocab_size=null",
        f"data.train_shards={out}/data/train-*.tar",
        f"data.val_shards={out}/data/val-*.tar",
        *(["train.epochs=2"] if args.quick else []),
        *args.overrides,
    ]
    runs = {name: out / f"run_k{k}" for name, k in MODELS.items()}
    overrides = {
        name: [*base, f"model.image_set.num_embeds={k}", f"model.text_set.num_embeds={k}"]
        for name, k in MODELS.items()
    }
    (set_name, set_run), (single_name, single_run) = runs.items()
    for run_dir in runs.values():
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own runs: trained anew each time
    cfg = config_lib.load([CONFIG], overrides[set_name])
    with _cores_shared_by(2), _background_training(single_name, single_run, overrides[single_name]):
        log.info("training %s -> %s", set_name, set_run)
        Trainer(cfg, set_run).train()
    rows, results = {}, {}
    for name, run_dir in runs.items():
        export_run(run_dir, tag="best")
        result = evaluate_export(
            load_exported(run_dir), f"{out}/data/test-*.tar", "coco", pick_device(),
            analysis=name == set_name,
        )  # fmt: skip
        write_result(result, run_dir / "eval")
        results[name] = result
        rows[name] = result.metrics[full_set_key("coco", len(result.image_ids))]
    for fig_name, fig in results[set_name].figures.items():  # attention, specialisation
        fig.savefig(out / f"{fig_name}.png", dpi=110, bbox_inches="tight")
    analysis = results[set_name].metrics.get("analysis", {})
    k = MODELS[set_name]
    specialisation = {
        "slot_max_attention": [analysis[f"slot_max_attention_{i}"] for i in range(k)],
        "uniform": analysis["slot_max_attention_uniform"],
    }
    loss = cfg.loss  # the same for both models
    switch = loss.mean_negative_epochs  # where the hard negatives start (0: none)
    _curves(runs, out, switch if switch and switch < cfg.train.epochs else None)
    return rows, specialisation
