"""Named components: similarities, set modules, encoders. A leaf: it imports nothing of setdiv.

The config types take their valid names from the registries (`setdiv.config`), so a bad name
fails when the config is loaded; a lookup here that misses is a caller that bypassed the config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict[str, T]):
    """Components of one `kind` by name; looking up an unknown name says which names exist."""

    def __init__(self, kind: str, entries: Mapping[str, T]) -> None:
        super().__init__(entries)
        self.kind = kind

    def __missing__(self, name: str) -> T:
        raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self)}")
