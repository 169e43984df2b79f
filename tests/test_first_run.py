"""The main job on a fresh machine: `setdiv demo` compiles nothing, warns about no CUDA, and is
training within 30 s of its launch."""

from __future__ import annotations

import selectors
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import CLEAN_ENV

ROOT = Path(__file__).parents[1]
NOISE = (
    "No CUDA runtime is found",  # torch.utils.cpp_extension, imported for a JIT build
    "built successfully",  # DeepSpeed's shared-memory comm op, JIT-compiled
    "Setting accelerator to CPU",  # DeepSpeed guessing its accelerator
    "ninja",
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_fresh_demo_is_quiet_and_trains_within_30_s(tmp_path: Path) -> None:
    """An empty torch-extensions cache stands in for a fresh machine (what a JIT build would
    fill); the demo is stopped once its first training epoch has started."""
    env = {**CLEAN_ENV, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    env.pop("DS_ACCELERATOR", None)
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/setdiv"), "demo", "--quick", "--out", str(tmp_path / "demo")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    started = None
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
        while started is None and time.monotonic() - start < 120:
            if not sel.select(timeout=1):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if "training from step 0" in line:
                started = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    log = "".join(lines)
    assert started is not None, log[-3000:]
    assert started < 30, f"training started {started:.1f} s after launch\n{log[-3000:]}"
    assert not [n for n in NOISE if n in log], log[-3000:]
    assert list(tmp_path.glob("extensions/**/*.so")) == []  # nothing was compiled
