"""Shared by tests that run `setdiv train` as a process: tiny synthetic data, a clean job
environment, metrics.jsonl readers, process checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from setdiv.data.convert import synthetic_samples
from setdiv.data.shards import write_shards
from setdiv.data.vocab import Vocab

T = TypeVar("T")
ROOT = Path(__file__).parents[1]
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    and not k.startswith("SLURM_")
}
"""Children start as fresh jobs, whatever this test process has in its env."""
RAY_ENV = {**CLEAN_ENV, "RAY_AUTH_MODE": "disabled"}
"""A throw-away local Ray: no token written to ~/.ray."""


def run_setdiv(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`setdiv ARGS` as a fresh single-node job from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "setdiv.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env=CLEAN_ENV,
    )  # fmt: skip


def write_data(root: Path, train: int = 256, val: int = 0, test: int = 0) -> Path:
    for split, n, per_shard in (("train", train, 64), ("val", val, 32), ("test", test, 32)):
        if n:
            write_shards(
                synthetic_samples(split, n, 0), root, split, "regions", "synthetic", per_shard
            )
    Vocab.build(c for s in synthetic_samples("train", train, 0) for c in s.captions).save(
        root / "vocab.json"
    )
    return root


def tiny_overrides(data: Path, epochs: int, val: bool = False) -> list[str]:
    return [
        f"model.text.vocab_path={data / 'vocab.json'}",
        "model.text.vocab_size=null",
        f"data.train_shards={data}/train-*.tar",
        *([f"data.val_shards={data}/val-*.tar", "data.eval_batch_size=32"] if val else []),
        "data.batch_size=32",
        "data.num_workers=1",
        f"train.epochs={epochs}",
        "train.log_every=1",
    ]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step from a run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def last_step(run_dir: Path) -> int:
    """Newest logged step of a run still being written (a torn last line is ignored)."""
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def launches(run_dir: Path) -> list[dict]:
    path = run_dir / "launches.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_groups_gone(pgids: list[int], timeout_s: float = 15.0) -> list[int]:
    """The process groups still alive after `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(group_alive(p) for p in pgids):
        time.sleep(0.2)
    return [p for p in pgids if group_alive(p)]


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 240.0) -> T:
    """`check()`'s first truthy value, polled every 0.2 s; an AssertionError naming `what`
    after `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes (other than this one) that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if text in line and int(cmdline.parent.name) != os.getpid():
            found.append(line)
    return found
