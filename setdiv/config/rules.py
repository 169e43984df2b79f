"""Rules of config fields: the error a bad config raises, and the range checks a field
carries in its metadata (checked after a merge, naming the dotted key). No torch, nothing from
setdiv but `setdiv.errors`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

from setdiv.errors import UserError

__all__ = ["Check", "ConfigError", "fraction", "non_negative", "positive", "ruled"]


class ConfigError(UserError):
    """A config file or override that does not fit the schema."""


# --- ranges: checked after the merge, naming the key ------------------------------------------

Check = Callable[[Any], str | None]
"""A field's rule: None when the value is fine, else what is wrong with it."""


def ruled(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


def positive(default: float) -> Any:
    """A field whose value must be > 0."""
    return ruled(default, lambda v: None if v > 0 else "must be > 0")


def non_negative(default: float) -> Any:
    """A field whose value must be >= 0."""
    return ruled(default, lambda v: None if v >= 0 else "must be >= 0")


def fraction(default: float) -> Any:
    """A probability-like field: in [0, 1)."""
    return ruled(default, lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
