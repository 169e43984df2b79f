"""Running setdiv: commands with retries, one variant trained / exported / evaluated, the
similarity-spread diagnosis."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from learning_bench.variants import CONFIG, REPO, Recipe, Variant, Width, setdiv_overrides

# --- setdiv runs -----------------------------------------------------------------------------


def setdiv_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("setdiv")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "setdiv.cli"]


COLLAPSED = 3
"""`setdiv train`'s exit code for a run stopped by the collapse guard (or divergence)."""


def run_cmd(
    cmd: list[str], log: Path, retries: int = 2, fresh: Path | None = None, accept: tuple = ()
) -> int:
    """Run a setdiv command, output appended to `log`; on failure retry after a minute (the
    tree is edited concurrently: a failure may be a half-saved file). `fresh`: a directory
    removed before each attempt (a training run starts clean, not resumed). An exit code in
    `accept` is an outcome, not a failure: returned, as 0 is."""
    for attempt in range(retries + 1):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        if rc == 0 or rc in accept:
            return rc
        tail = "\n".join(log.read_text().splitlines()[-15:])
        print(f"  command failed (rc {rc}, attempt {attempt + 1}); log {log}:\n{tail}", flush=True)
        if attempt < retries:
            time.sleep(60)
    raise RuntimeError(f"failed: {' '.join(cmd)} (see {log})")


def run_setdiv(
    v: Variant, dropout: bool, seed: int, w: Width, r: Recipe, shards: Path, vocab: Path, rd: Path,
    noise: float = 0.0,
) -> dict:  # fmt: skip
    """Train, export the final checkpoint, evaluate on test and the train subset."""
    log = rd.parent / f"{rd.name}.log"
    log.unlink(missing_ok=True)
    rd.parent.mkdir(parents=True, exist_ok=True)
    overrides = setdiv_overrides(v, dropout, seed, w, r, shards, vocab, noise)
    t0 = time.perf_counter()
    train = [*setdiv_cmd(), "train", str(CONFIG), *overrides, "--run-dir", str(rd)]
    rc = run_cmd(train, log, fresh=rd, accept=(COLLAPSED,))
    # A run the collapse guard stopped is scored from its last checkpoint, and says so.
    stopped = [x for x in log.read_text().splitlines() if "training collapsed" in x][-1:]
    train_s = time.perf_counter() - t0
    run_cmd([*setdiv_cmd(), "export", str(rd), "--tag", "latest"], log)
    scores = {}
    for name, split in (("test", "test"), ("train", "trainsub")):
        cmd = [*setdiv_cmd(), "eval", str(rd), "--data", f"{shards}/{split}-*.tar"]
        run_cmd([*cmd, "--protocol", "coco", "--out", str(rd / f"eval_{name}")], log)
        scores[name] = _full_set(rd / f"eval_{name}")
    records = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines() if x]
    last = [x for x in records if "i2t_loss" in x and x["epoch"] == r.epochs - 1]
    spreads = [x["sim_std"] for x in last if "sim_std" in x]
    return {
        "stopped": stopped[0].split("error: ", 1)[-1] if rc == COLLAPSED and stopped else None,
        "final_sim_std": statistics.fmean(spreads) if spreads else None,
        "fallback_steps": sum(x.get("all_negatives", 0) for x in records),
        **scores,
        "train_min": train_s / 60,
        "eval_min": (time.perf_counter() - t0 - train_s) / 60,
        "final_i2t_loss": statistics.fmean(x["i2t_loss"] for x in last) if last else None,
        "final_t2i_loss": statistics.fmean(x["t2i_loss"] for x in last) if last else None,
        "val_rsum": [x["val_rsum"] for x in records if "val_rsum" in x],
        "run_dir": str(rd),
    }


def similarity_spread(rd: Path, shards: Path) -> dict[str, dict[str, float]]:
    """The collapse diagnostic of a finished setdiv run, on one evaluation batch of training
    images (eval mode): for the model at initialisation (its config, its seed) and for the
    exported final model, the mean and std of the image-caption similarities, the mean over
    captions of (hardest negative image - positive image), and the share of captions whose
    hardest negative outscores the positive. A collapsed model has a tiny std and a gap ~0."""
    from setdiv.data.loaders import build_eval_reader
    from setdiv.export import load_exported
    from setdiv.losses import positive_mask
    from setdiv.model import build_model
    from setdiv.similarity import build_similarity

    final = load_exported(rd)
    cfg = final.cfg
    batch = next(
        iter(build_eval_reader(cfg.data, f"{shards}/train-*.tar", "regions", final.tokenizer, 0, 1))
    )
    torch.manual_seed(cfg.train.seed)  # as the trainer does before building the model
    init = build_model(cfg.model, pretrained=False).eval()
    similarity = build_similarity(cfg.similarity)
    out = {}
    for name, model in (("init", init), ("final", final.model.eval())):
        with torch.no_grad():
            img = model.encode_image(batch.images, batch.image_mask).embeds
            txt = model.encode_text(batch.tokens, batch.token_mask).embeds
            sims_NM = similarity(img, txt).float()
        pos_NM = positive_mask(*sims_NM.shape)
        positive_M = sims_NM.masked_fill(~pos_NM, float("-inf")).amax(dim=0)
        hardest_M = sims_NM.masked_fill(pos_NM, float("-inf")).amax(dim=0)
        gap_M = hardest_M - positive_M
        out[name] = {
            "mean": float(sims_NM.mean()),
            "std": float(sims_NM.std()),
            "hardest_minus_positive": float(gap_M.mean()),
            "hardest_wins": float((gap_M > 0).float().mean()),
        }
    return out


def diagnose(run_dirs: list[Path], shards: Path) -> str:
    """A markdown table of `similarity_spread` for finished setdiv runs."""
    lines = [
        "| run | S at init: mean ± std | S final: mean ± std | final hardest neg − pos "
        "| captions whose hardest negative wins |",
        "|---|---|---|---:|---:|",
    ]
    for rd in run_dirs:
        d = similarity_spread(rd, shards)
        i, f = d["init"], d["final"]
        lines.append(
            f"| {rd.name} | {i['mean']:.3f} ± {i['std']:.4f} | {f['mean']:.3f} ± {f['std']:.4f} "
            f"| {f['hardest_minus_positive']:+.3f} | {100 * f['hardest_wins']:.0f}% |"
        )
    return "\n".join(lines)


def _full_set(eval_dir: Path) -> dict[str, float]:
    """The whole-set recall group (`coco_<N>`) of a `setdiv eval` output directory."""
    from setdiv.eval.evaluator import full_set_key

    n = len(json.loads((eval_dir / "sims_meta.json").read_text())["image_ids"])
    return json.loads((eval_dir / "metrics.json").read_text())[full_set_key("coco", n)]
