"""`setdiv index build --ray` on a real two-node Ray cluster on this machine (a head and a
worker started with `ray start`, stopped at the end): the index equals the local build's,
elements bitwise."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from run_helpers import RAY_ENV, processes_mentioning, run_setdiv

from setdiv.data.convert import synthetic_samples
from setdiv.data.shards import write_shards
from setdiv.data.vocab import Vocab
from setdiv.distributed import free_port
from setdiv.index.store import SetIndexStore

pytest.importorskip("ray.data", reason="Ray Data is not installed")
ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def ray_start(*args: str, log: Path) -> subprocess.Popen:
    """`ray start ... --block`: the node lives as long as this process does. One CPU slot
    each: the two encoder actors can only run one on each node."""
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0",
         "--disable-usage-stats", *args],
        env=RAY_ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_build_on_two_nodes_equals_the_local_build(tmp_path: Path) -> None:
    from test_index import make_export

    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        tmp_path / "vocab.json"
    )
    export = make_export(tmp_path, 0)
    write_shards(synthetic_samples("test", 200, 0), tmp_path / "g", "test", "regions", "syn", 50)
    data = f"{tmp_path}/g/test-*.tar"
    build = ["index", "build", str(export), "--data", data, "--batch-size", "16"]
    local = run_setdiv(*build, "--modality", "image", "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]

    temp = tempfile.mkdtemp(prefix="sdr", dir="/tmp")  # (Ray's socket paths: keep it short)
    port = free_port()
    head = ray_start("--head", "--port", str(port), "--temp-dir", temp,
                     "--include-dashboard", "false", log=tmp_path / "head.log")  # fmt: skip
    worker = None
    try:
        time.sleep(3)
        worker = ray_start("--address", f"127.0.0.1:{port}", log=tmp_path / "worker.log")
        up = subprocess.run(
            [sys.executable, "-m", "setdiv_cluster.ray_cluster", "wait", f"127.0.0.1:{port}", "2",
             "--timeout", "120"], env=RAY_ENV, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr[-2000:]
        out = tmp_path / "ray"
        done = run_setdiv(*build, "--modality", "image", "--out", str(out), "--ray",
                          "--address", f"127.0.0.1:{port}", timeout=400)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "encoded on 2 Ray node(s)" in done.stderr, done.stderr[-3000:]
        one, two = SetIndexStore.open(tmp_path / "local"), SetIndexStore.open(out)
        assert len(one) == 200
        assert two.items == one.items
        assert torch.equal(two.elements(), one.elements())  # bitwise, float32
        same = ("export_sha256", "num_embeds", "dim", "dtype", "count", "part_sizes")
        assert [getattr(two.meta, k) for k in same] == [getattr(one.meta, k) for k in same]
    finally:  # the worker first (it drains at once), then the head; what lingers is killed
        for proc in (worker, head):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and processes_mentioning(temp):
        time.sleep(0.5)
    assert processes_mentioning(temp) == []
    shutil.rmtree(temp, ignore_errors=True)
