"""The errors setdiv reports to a user as one line (exit 2) rather than as a traceback.

A `UserError` is bad input: a config key, a missing or damaged file, a corrupt shard, a flag
out of range. The CLI prints its message and exits with its `exit_code`; anything else is a bug
in setdiv and keeps its traceback, so it shows where it happened.
"""

from __future__ import annotations

__all__ = ["UserError", "check_at_least"]


class UserError(ValueError):
    """Bad input from the user (config, files, data); the message names what to fix."""

    exit_code = 2


def check_at_least(bounds: dict[str, tuple[float | None, float]]) -> None:
    """`{"--flag": (value, lowest allowed)}`: a `UserError` naming the first flag whose value
    is below its bound (a value of None is not checked: the flag was not given)."""
    for flag, (value, low) in bounds.items():
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low:g}, got {value:g}")
