"""What the cluster scripts share at their edge: one `main` wrapper, one exit code for an
interrupted run."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from setdiv.errors import report

__all__ = ["INTERRUPTED", "run_cli"]

INTERRUPTED = 130
"""Exit code of a sweep / ensemble stopped before it finished (re-running resumes it)."""


def run_cli(
    prog: str,
    parser: argparse.ArgumentParser,
    work: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse `argv` (options and positionals intermixed), run `work`; a user error (bad input,
    a missing file, a failed child job) is one line `PROG: error: ...` and its exit code
    (`setdiv.errors.report`) instead of a traceback."""
    args = parser.parse_intermixed_args(argv)
    try:
        return work(args)
    except Exception as exc:  # noqa: BLE001 -- `report` re-raises all but user errors
        return report(prog, exc)
