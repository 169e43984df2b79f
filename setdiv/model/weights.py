"""Reading pretrained weights into a tower, without executing code, and with one-line errors
naming the config key and the file: a file that is damaged, truncated, of another
architecture, width or vocabulary is refused before anything trains."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from setdiv.errors import UserError

__all__ = ["hf_config", "hf_pretrained", "load_fitting", "load_state_dict_file"]


def load_state_dict_file(path: str | Path, key: str | None = None) -> dict[str, Tensor]:
    """Read weights from .safetensors or a torch file, without executing code (weights_only).
    Errors name the config `key` (when given) and the file; a file torch will not read
    weights-only is refused, never loaded any other way."""
    path = Path(path)
    where = f"config key '{key}': " if key else ""
    if not path.is_file():
        raise FileNotFoundError(f"{where}weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error classes
            raise UserError(
                f"{where}{path} is not a readable safetensors file (truncated or damaged: "
                f"{str(exc).splitlines()[0][:200]})"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- pickle, zip and EOF errors alike
        # torch's own text suggests weights_only=False, i.e. running the file's code: not here.
        raise UserError(
            f"{where}{path} is not a weights-only checkpoint ({type(exc).__name__}): it is "
            "damaged, or it holds Python objects besides tensors and plain containers. Save "
            "its state_dict alone (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{where}{path} does not hold a state dict of tensors")
    return state


def load_fitting(
    module: nn.Module, state: dict[str, Tensor], key: str, path: str | Path, arch: str,
    spare: Sequence[str] = (),
) -> None:  # fmt: skip
    """Load `state` into `module`, or raise one UserError: tensors of another shape (a
    checkpoint of another width, depth or vocabulary), or missing / unexpected names other
    than those starting with a `spare` prefix (a classifier head the tower does not use)."""
    mine = module.state_dict()
    shapes = [
        f"{k} {tuple(v.shape)} (the model's: {tuple(mine[k].shape)})"
        for k, v in state.items()
        if k in mine and v.shape != mine[k].shape
    ]
    if shapes:
        raise UserError(
            f"config key '{key}': {path} does not fit {arch}: {len(shapes)} tensor(s) of "
            f"another shape, e.g. {shapes[0]}: a checkpoint of another width or vocabulary?"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(tuple(spare))]
    unexpected = [k for k in unexpected if not k.startswith(tuple(spare))]
    if missing or unexpected:
        raise UserError(
            f"config key '{key}': {path} does not fit {arch}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def hf_config(path: str) -> Any:
    """The `transformers` config of the local directory `path` (`model.text.bert_path`)."""
    from transformers import AutoConfig

    where = f"config key 'model.text.bert_path': {path}"
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{where} has no config.json: not a Hugging Face model directory")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{where}: its config.json is not usable ({_first_line(exc)})") from None


def hf_pretrained(cls: Any, path: str, **kw: Any) -> nn.Module:
    """`cls.from_pretrained(path)` from local files only; no weights file, or a damaged or
    truncated one, is one UserError naming the directory."""
    try:
        return cls.from_pretrained(path, local_files_only=True, **kw)
    except Exception as exc:  # noqa: BLE001 -- OSError, safetensors' and torch's own errors
        raise UserError(
            f"config key 'model.text.bert_path': {path}: its weights cannot be read "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
