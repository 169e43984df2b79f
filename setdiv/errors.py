"""The errors setdiv reports to a user as one line (exit 2) rather than as a traceback.

A `UserError` is bad input: a config key, a missing or damaged file, a corrupt shard, a flag
out of range. The CLI prints its message and exits with its `exit_code`; anything else is a bug
in setdiv and keeps its traceback, so it shows where it happened.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = [
    "ArgumentParser",
    "UserError",
    "check_at_least",
    "positive_int",
    "report",
    "user_exit_code",
]


class UserError(ValueError):
    """Bad input from the user (config, files, data); the message names what to fix."""

    exit_code = 2


def check_at_least(bounds: dict[str, tuple[float | None, float]]) -> None:
    """`{"--flag": (value, lowest allowed)}`: a `UserError` naming the first flag whose value
    is below its bound (a value of None is not checked: the flag was not given)."""
    for flag, (value, low) in bounds.items():
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low:g}, got {value:g}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors (an unknown flag, a bad value) as one line `PROG: error: ...`
    and exit 2, like every other user error; `--help` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type of a count that must be >= 1 (`--nproc`, `--batch-size`): a bad value
    is argparse's one-line usage error (exit 2), before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def user_exit_code(exc: BaseException) -> int | None:
    """The exit code of an error the user can act on -- bad input (`UserError`), a file that is
    not there, an error that carries its own `exit_code` (a diverged run: 3, a failed child
    job: 1) -- or None for anything else, a bug."""
    if isinstance(exc, UserError | FileNotFoundError) or hasattr(exc, "exit_code"):
        return int(getattr(exc, "exit_code", 2))
    return None


def report(prog: str, exc: BaseException) -> int:
    """Inside an `except` block: a user error printed as one line `PROG: error: MESSAGE` on
    stderr, its exit code returned; anything else re-raised with its traceback, so a bug
    shows where it happened. Every setdiv command line reports its errors through this."""
    code = user_exit_code(exc)
    if code is None:
        raise exc
    print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
    return code
