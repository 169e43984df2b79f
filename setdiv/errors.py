"""The errors setdiv reports to a user as one line (exit 2) rather than as a traceback.

A `UserError` is bad input: a config key, a missing or damaged file, a corrupt shard, a flag
out of range. The CLI prints its message and exits with its `exit_code`; anything else is a bug
in setdiv and keeps its traceback, so it shows where it happened.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user (config, files, data); the message names what to fix."""

    exit_code = 2
