"""Start-up time of the launchers: wall seconds of `--help` (and of loading every shipped
config), each the median of `--repeats` fresh processes, against `python -c "import torch"`
measured in the same run (what every launcher paid while the config imported the models).

    python tools/bench_startup.py [--repeats 5] [--against WORKTREE]

`--against`: also time the same launchers of another checkout (`git worktree add /tmp/old
COMMIT`), imported from there (PYTHONPATH), in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CASES = {
    'python -c "import torch" (baseline)': [PY, "-c", "import torch"],
    "python cluster/submit.py --help": [PY, "cluster/submit.py", "--help"],
    "python cluster/sweep.py --help": [PY, "cluster/sweep.py", "--help"],
    "python cluster/ensemble.py --help": [PY, "cluster/ensemble.py", "--help"],
    "setdiv --help": [PY, "-m", "setdiv.cli", "--help"],
    "load every configs/*.yaml": [
        PY, "-c",
        "import glob, setdiv.config as c\n"
        "for f in sorted(glob.glob('configs/*.yaml')): c.load([f])",
    ],
}  # fmt: skip


def seconds(cmd: list[str], tree: Path = ROOT) -> float:
    env = os.environ if tree == ROOT else {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, timeout=300)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", type=Path, default=None, help="another checkout")
    args = parser.parse_args()
    cases = {name: (cmd, ROOT) for name, cmd in CASES.items()}
    if args.against is not None:
        for name in ("python cluster/submit.py --help", "setdiv --help"):
            cases[f"{name} ({args.against})"] = (CASES[name], args.against.resolve())
    for cmd, tree in cases.values():  # warm the page cache once
        seconds(cmd, tree)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved: load changes hit every case alike
        for name, (cmd, tree) in cases.items():
            times[name].append(seconds(cmd, tree))
    base = statistics.median(next(iter(times.values())))
    print(f"{platform.node()}: {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, median of {args.repeats}")  # fmt: skip
    print("| command | seconds | vs import torch |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| `{name}` | {t:.2f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
