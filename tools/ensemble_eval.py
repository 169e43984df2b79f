"""Average the similarity matrices of several runs (e.g. seeds) and compare with each alone.

    python tools/ensemble_eval.py runs/s0/eval/sims.npy runs/s1/eval/sims.npy \
        [--protocol coco] [--out runs/ensemble]

Each sims.npy needs its sims_meta.json beside it; all must share shape, image ids and caption ids.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

from setdiv import errors
from setdiv.config import Protocol
from setdiv.errors import report
from setdiv.eval.ensemble import ensemble
from setdiv.eval.evaluator import format_table, write_result


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sims", nargs="+", type=Path, help="sims.npy files")
    parser.add_argument(
        "--protocol",
        choices=get_args(Protocol),
        default=None,
        help="default: the protocol the members were evaluated with (sims_meta.json)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the ensemble's sims + metrics"
    )
    args = parser.parse_args(argv)
    try:
        rows, result = ensemble(args.sims, args.protocol)
    except Exception as exc:  # noqa: BLE001 -- `report` re-raises all but user errors
        return report("ensemble_eval", exc)
    protocol = result.meta["protocol"]
    print(format_table(rows, title=f"{len(args.sims)} models, protocol {protocol}"))
    if args.out:
        write_result(result, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
