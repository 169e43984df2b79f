"""`setdiv export`: an export directory (`setdiv.export`) from a training run's checkpoint.

Above `train/` (it reads DeepSpeed checkpoints through `setdiv.train.checkpoint`) and above
`setdiv.export` (the exchanged format), which knows nothing of training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from setdiv import config as config_lib
from setdiv.data.vocab import Vocab
from setdiv.export import architecture_only, export_model
from setdiv.model import build_model
from setdiv.paths import RunFiles
from setdiv.train import checkpoint

__all__ = ["add_arguments", "export_run", "run"]


def export_run(run_dir: str | Path, tag: str | None = None, out: str | Path | None = None) -> Path:
    """Consolidated fp32 weights of a run's checkpoint (default `latest`) -> `RUN/export/`."""
    run = RunFiles(run_dir)
    cfg = config_lib.load([run.config])
    state = checkpoint.consolidated_weights(run.root, tag)
    # The objective's parameters (InfoNCE's temperature) trained with the model but are not
    # part of it: the temperature travels in the header.
    metadata = {}
    if "objective.log_scale" in state:
        scale = float(state["objective.log_scale"].exp())
        scale = min(max(scale, 1.0), cfg.loss.max_logit_scale)  # clamped, as in training
        metadata["temperature"] = f"{1 / scale:.6g}"
    state = {k: v for k, v in state.items() if not k.startswith("objective.")}
    model = build_model(architecture_only(cfg, run.root).model, pretrained=False)
    model.load_state_dict(state)
    vocab = Vocab.load(run.vocab) if run.vocab.is_file() else None
    return export_model(model, cfg, out or run.export, vocab, metadata)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="training run directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest; e.g. best)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.tag, args.out)
    print(f"exported {out}")
    return 0
