"""Exported models: a directory users exchange, loadable without executing code.

    model.safetensors   consolidated fp32 weights
    config.yaml         the resolved config
    vocab.json          bi-GRU vocabulary (bigru models)
    bert/               BERT config.json + tokenizer files, no weights (bert models)

The exchanged format only (file names: `setdiv.paths.ExportFiles`): `export_model` writes one,
`load_exported` rebuilds the architecture without reading any backbone / GloVe file
(`architecture_only`) and loads the weights, so an export runs on any machine; `find_export`
and `export_identity` locate and identify one. Making an export from a training run's
checkpoint is `setdiv.export_run`, above training.
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
from setdiv.data.text import Tokenizer, build_tokenizer, config_vocab
from setdiv.data.vocab import Vocab
from setdiv.errors import UserError
from setdiv.model import SetRetrievalModel, build_model
from setdiv.model.weights import load_state_dict_file
from setdiv.paths import ExportFiles, RunFiles

__all__ = [
    "ExportedModel",
    "architecture_only",
    "export_identity",
    "export_model",
    "find_export",
    "load_exported",
]


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
    out = ExportFiles(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out.weights), metadata={"format": "setdiv/1", **(metadata or {})})
    _follow_umask(out.weights)  # safetensors writes 0600 whatever the umask
    text = cfg.model.text
    if text.name == "bigru":
        vocab = vocab or config_vocab(text, "exporting a bigru model")
        vocab.save(out.vocab)
    elif text.bert_path is not None:
        out.bert.mkdir(exist_ok=True)
        for f in Path(text.bert_path).iterdir():
            if f.is_file() and not f.name.endswith((".bin", ".safetensors", ".h5", ".msgpack")):
                shutil.copy2(f, out.bert / f.name)
    config_lib.save(cfg, out.config)
    return out.root


def architecture_only(
    cfg: config_lib.Config, assets: str | Path | None = None, vocab_size: int | None = None
) -> config_lib.Config:
    """`cfg` with no pretrained-weights file to read (image weights, GloVe), for a model whose
    weights are loaded afterwards or left random. The text assets come from the directory
    `assets` (an export, a run): its `vocab.json` (bigru), its `bert/` (BERT config and
    tokenizer) where present. With `assets=None` nothing is read at all: no BERT directory,
    and a bigru with a vocabulary file gets `vocab_size` words instead."""
    text = replace(cfg.model.text, glove_path=None)
    root = ExportFiles(assets) if assets is not None else None  # (a run dir: the same names)
    if text.name == "bigru":
        if root is not None:
            text = replace(text, vocab_path=str(root.vocab), vocab_size=None)
        elif text.vocab_path is not None:
            text = replace(text, vocab_path=None, vocab_size=vocab_size)
    elif root is None:
        text = replace(text, bert_path=None)
    elif root.bert.is_dir():
        text = replace(text, bert_path=str(root.bert))
    image = replace(cfg.model.image, weights=None)
    return replace(cfg, model=replace(cfg.model, text=text, image=image))


def find_export(path: str | Path) -> Path:
    """The export directory for an export dir, its weights file, or a run dir (`RUN/export`)."""
    p = Path(path)
    for cand in (ExportFiles(p if p.is_dir() else p.parent), ExportFiles(RunFiles(p).export)):
        if cand.complete():
            return cand.root
    here = ExportFiles(p)
    raise FileNotFoundError(
        f"{p}: no {here.weights.name} + {here.config.name} here or in {RunFiles(p).export} (run "
        "`setdiv export RUN_DIR`)"
    )


def export_identity(path: str | Path) -> tuple[str, str, str]:
    """(export directory, sha256 of its weights, its config.yaml text): what an index records
    of the export that encoded it."""
    files = ExportFiles(find_export(path))
    return str(files.root.resolve()), sha256_file(files.weights), files.config.read_text()


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Rebuild and load an exported model (eval mode) with its tokenizer."""
    files = ExportFiles(find_export(path))
    weights, config = files.weights, files.config
    cfg = architecture_only(config_lib.load([config]), files.root)
    model = build_model(cfg.model, pretrained=False)
    state = load_state_dict_file(weights)
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise UserError(
            f"{weights}: {len(broken)} tensor(s) hold NaN or inf values (e.g. "
            f"{broken[0]}): the weights are broken (a diverged run?); export another checkpoint"
        )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ: torch lists every tensor
        lines = [x.strip() for x in str(exc).splitlines() if "size mismatch" in x]
        raise UserError(f"{weights} does not fit {config}: {'; '.join(lines[:3])}") from None
    if missing or unexpected:
        raise UserError(
            f"{weights} does not fit {config}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return ExportedModel(
        model.to(device).eval(), cfg, build_tokenizer(cfg.model.text), sha256_file(weights)
    )
