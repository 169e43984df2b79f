"""Exported models: a directory users exchange, loadable without executing code.

    model.safetensors   consolidated fp32 weights
    config.yaml         the resolved config
    vocab.json          bi-GRU vocabulary (bigru models)
    bert/               BERT config.json + tokenizer files, no weights (bert models)

`export_run` writes one from a training run's checkpoint; `load_exported` rebuilds the
architecture without reading any backbone / GloVe file (`architecture_only`) and loads the
weights, so an export runs on any machine.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from setdiv import config as config_lib
from setdiv.data.shards import sha256_file
from setdiv.data.text import Tokenizer, build_tokenizer
from setdiv.data.vocab import Vocab
from setdiv.errors import UserError
from setdiv.model import SetRetrievalModel, build_model
from setdiv.model.weights import load_state_dict_file
from setdiv.train import checkpoint

__all__ = [
    "WEIGHTS",
    "ExportedModel",
    "architecture_only",
    "export_model",
    "export_run",
    "find_export",
    "load_exported",
]

WEIGHTS = "model.safetensors"


@dataclass
class ExportedModel:
    model: SetRetrievalModel
    cfg: config_lib.Config
    tokenizer: Tokenizer
    sha256: str
    """Hash of model.safetensors: identifies the weights in evaluation metadata."""


def _follow_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def export_model(
    model: nn.Module,
    cfg: config_lib.Config,
    out_dir: str | Path,
    vocab: Vocab | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `model` (fp32, contiguous) with its config and text assets into `out_dir`;
    `metadata` joins the weights file's header (InfoNCE's learned temperature)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "setdiv/1", **(metadata or {})})
    _follow_umask(out / WEIGHTS)  # safetensors writes 0600 whatever the umask
    text = cfg.model.text
    if text.name == "bigru":
        if vocab is None:
            if text.vocab_path is None:
                raise UserError("exporting a bigru model needs its vocabulary")
            vocab = Vocab.load(text.vocab_path)
        vocab.save(out / "vocab.json")
    elif text.bert_path is not None:
        bert_out = out / "bert"
        bert_out.mkdir(exist_ok=True)
        for f in Path(text.bert_path).iterdir():
            if f.is_file() and not f.name.endswith((".bin", ".safetensors", ".h5", ".msgpack")):
                shutil.copy2(f, bert_out / f.name)
    config_lib.save(cfg, out / "config.yaml")
    return out


def architecture_only(
    cfg: config_lib.Config, assets: str | Path | None = None, vocab_size: int | None = None
) -> config_lib.Config:
    """`cfg` with no pretrained-weights file to read (image weights, GloVe), for a model whose
    weights are loaded afterwards or left random. The text assets come from the directory
    `assets` (an export, a run): its `vocab.json` (bigru), its `bert/` (BERT config and
    tokenizer) where present. With `assets=None` nothing is read at all: no BERT directory,
    and a bigru with a vocabulary file gets `vocab_size` words instead."""
    text = replace(cfg.model.text, glove_path=None)
    root = Path(assets) if assets is not None else None
    if text.name == "bigru":
        if root is not None:
            text = replace(text, vocab_path=str(root / "vocab.json"), vocab_size=None)
        elif text.vocab_path is not None:
            text = replace(text, vocab_path=None, vocab_size=vocab_size)
    elif root is None:
        text = replace(text, bert_path=None)
    elif (root / "bert").is_dir():
        text = replace(text, bert_path=str(root / "bert"))
    image = replace(cfg.model.image, weights=None)
    return replace(cfg, model=replace(cfg.model, text=text, image=image))


def export_run(run_dir: str | Path, tag: str | None = None, out: str | Path | None = None) -> Path:
    """Consolidated fp32 weights of a run's checkpoint (default `latest`) -> `RUN/export/`."""
    run_dir = Path(run_dir)
    cfg = config_lib.load([run_dir / "config.yaml"])
    state = checkpoint.consolidated_weights(run_dir, tag)
    # The objective's parameters (InfoNCE's temperature) trained with the model but are not
    # part of it: the temperature travels in the header.
    metadata = {}
    if "objective.log_scale" in state:
        scale = float(state["objective.log_scale"].exp())
        scale = min(max(scale, 1.0), cfg.loss.max_logit_scale)  # clamped, as in training
        metadata["temperature"] = f"{1 / scale:.6g}"
    state = {k: v for k, v in state.items() if not k.startswith("objective.")}
    model = build_model(architecture_only(cfg, run_dir).model, pretrained=False)
    model.load_state_dict(state)
    vocab = Vocab.load(run_dir / "vocab.json") if (run_dir / "vocab.json").is_file() else None
    return export_model(model, cfg, out or run_dir / "export", vocab, metadata)


def find_export(path: str | Path) -> Path:
    """The export directory for an export dir, its weights file, or a run dir (`RUN/export`)."""
    p = Path(path)
    for cand in (p if p.is_dir() else p.parent, p / "export"):
        if (cand / WEIGHTS).is_file() and (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(
        f"{p}: no {WEIGHTS} + config.yaml here or in {p / 'export'} (run `setdiv export RUN_DIR`)"
    )


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild and load an exported model (eval mode) with its tokenizer."""
    root = find_export(path)
    cfg = architecture_only(config_lib.load([root / "config.yaml"]), root)
    model = build_model(cfg.model, pretrained=False)
    state = load_state_dict_file(root / WEIGHTS)
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise UserError(
            f"{root / WEIGHTS}: {len(broken)} tensor(s) hold NaN or inf values (e.g. "
            f"{broken[0]}): the weights are broken (a diverged run?); export another checkpoint"
        )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: torch lists every tensor
        lines = [x.strip() for x in str(exc).splitlines() if "size mismatch" in x]
        raise UserError(
            f"{root / WEIGHTS} does not fit {root / 'config.yaml'}: {'; '.join(lines[:3])}"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{root / WEIGHTS} does not fit {root / 'config.yaml'}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return ExportedModel(
        model.to(device).eval(), cfg, build_tokenizer(cfg.model.text), sha256_file(root / WEIGHTS)
    )
