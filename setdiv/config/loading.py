"""Loading configs: YAML deltas merged over the schema's defaults, dotted overrides, checks,
saving. The only reader of YAML and of override strings in setdiv."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from setdiv.config.rules import ConfigError
from setdiv.config.schema import Config

__all__ = ["PATH_KEYS", "load", "override", "paths", "save", "to_yaml"]


# --- checking ----------------------------------------------------------------------------------


def _choices(section: type, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    """Dotted key -> choices of every `Literal` field under the config section `section`."""
    hints = get_type_hints(section)
    out: dict[str, tuple[Any, ...]] = {}
    for f in fields(section):
        hint = hints[f.name]
        if is_dataclass(hint):
            out |= _choices(hint, f"{prefix}{f.name}.")
        elif get_origin(hint) is Literal:
            out[prefix + f.name] = get_args(hint)
    return out


_CHOICES = _choices(Config)
"""Derived from the types, for error messages that list the valid values."""


def _floats(key: str, value: Any) -> Iterator[tuple[str, float]]:
    """(dotted key, number) of every float in `value`, inside lists and dicts too."""
    if isinstance(value, float):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _floats(f"{key}.{k}", v)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _floats(f"{key}.{i}", v)


def _check(section: Any, prefix: str = "") -> None:
    """Every field of a config section (at the dotted `prefix`) against its rules: numbers
    finite, each field's own check, then the section's `_conflict` between fields."""
    for f in fields(section):
        key, value = prefix + f.name, getattr(section, f.name)
        if is_dataclass(value):
            _check(value, f"{key}.")
            continue
        for leaf, number in _floats(key, value):
            if not math.isfinite(number):
                raise ConfigError(f"bad config key '{leaf}': {number} is not a finite number")
        why = f.metadata["check"](value) if "check" in f.metadata else None
        if why is not None:
            raise ConfigError(f"bad config key '{key}': {why}")
    conflict = getattr(section, "_conflict", None)
    found = conflict() if conflict is not None else None
    if found is not None:
        raise ConfigError(f"bad config key '{prefix}{found[0]}': {found[1]}")


# --- loading -----------------------------------------------------------------------------------


def _error(source: str, exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    if isinstance(exc, ValidationError) and key in _CHOICES:
        msg = f"{exc.value!r} is not one of {list(_CHOICES[key])}"
    return ConfigError(f"{source}: bad config key '{key}': {msg}")


def _merge(base: DictConfig, delta: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, delta)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _error(source, exc) from None


def load(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults, then each YAML file in order, then dotted overrides such as `model.embed_dim=8`.

    Raises `ConfigError` naming the file or override and the dotted key on an unknown key, a
    wrong type, a value outside its choices or range, or a malformed override.
    """
    cfg = OmegaConf.structured(Config)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            delta = OmegaConf.load(path)  # YAML safe loading
        except Exception as exc:  # noqa: BLE001 -- yaml errors come in many classes
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if delta is None or not isinstance(delta, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping")
        cfg = _merge(cfg, delta, str(path))
    return _overridden(cfg, overrides)


def override(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with dotted `key=value` overrides applied and checked (as `load` does)."""
    return _overridden(OmegaConf.structured(cfg), overrides)


def _overridden(cfg: DictConfig, overrides: Sequence[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    out: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    _check(out)
    return out


PATH_KEYS = (
    "model.image.weights",
    "model.text.vocab_path",
    "model.text.glove_path",
    "model.text.bert_path",
    "data.train_shards",
    "data.val_shards",
    "data.features",
)
"""Dotted keys that name local files (the `*_shards` keys: brace / glob patterns). A run checks
them where it starts; a launcher on another machine can only warn about them."""


def paths(cfg: Config) -> dict[str, str]:
    """The file and shard paths `cfg` names, by dotted key (unset keys left out)."""
    node = OmegaConf.structured(cfg)
    out = {k: v for k in PATH_KEYS if (v := OmegaConf.select(node, k)) is not None}
    for i, source in enumerate(cfg.data.train_sources):
        out[f"data.train_sources.{i}.shards"] = source.shards
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (every key, defaults included)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config; `load([path])` returns an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
