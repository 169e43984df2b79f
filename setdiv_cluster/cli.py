"""What the cluster scripts share at their edge: one `main` wrapper, one exit code for an
interrupted run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from setdiv.errors import UserError

__all__ = ["INTERRUPTED", "run_cli"]

INTERRUPTED = 130
"""Exit code of a sweep / ensemble stopped before it finished (re-running resumes it)."""


def run_cli(
    prog: str,
    parser: argparse.ArgumentParser,
    work: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parse `argv` (options and positionals intermixed), run `work`; bad input
    (`UserError`, a missing file) and the given `errors` become one line `PROG: error: ...`
    and their `exit_code` (default 2) instead of a traceback."""
    args = parser.parse_intermixed_args(argv)
    try:
        return work(args)
    except (UserError, FileNotFoundError, *errors) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
