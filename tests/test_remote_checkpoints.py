"""Checkpoints in a remote store (`train.remote_dir`): moto's S3 server (its own process,
reached by s3fs over HTTP) receives them; a run killed with SIGKILL whose local run directory
is then deleted resumes from the remote latest to the weights of an uninterrupted run; a
partial upload never becomes latest."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from remote_servers import S3_ENV, s3_server
from run_helpers import CLEAN_ENV, ROOT, losses, run_setdiv, tiny_overrides, write_data

from setdiv.train.checkpoint import consolidated_weights
from setdiv.train.remote_store import RemoteCheckpoints, fetch_latest, remote_latest

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"), train=256)


def args(data: Path, run: Path, *extra: str) -> list[str]:
    return [
        "train", str(ROOT / "configs/demo.yaml"), *tiny_overrides(data, epochs=3),
        "model.image.dropout=0.0", "model.text.dropout=0.0", "train.ckpt_every=3",
        "train.keep_last=2", *extra, "--run-dir", str(run),
    ]  # fmt: skip


@pytest.mark.slow
def test_a_run_resumes_from_s3_after_losing_its_run_directory(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs)")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import s3fs

    ref = tmp_path / "ref"
    done = run_setdiv(*args(data, ref))
    assert done.returncode == 0, done.stderr[-3000:]
    with s3_server(tmp_path / "moto") as endpoint:
        env = {**CLEAN_ENV, **S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        fs = s3fs.S3FileSystem(
            key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=endpoint, skip_instance_cache=True,
        )  # fmt: skip
        fs.mkdir("runs")
        store, run = "s3://runs/tiny", tmp_path / "run"
        cmd = [sys.executable, "-m", "setdiv.cli", *args(data, run, f"train.remote_dir={store}")]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline, uploaded = time.time() + 300, None
        while time.time() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if fs.exists("runs/tiny/checkpoints/latest"):
                uploaded = fs.cat_file("runs/tiny/checkpoints/latest").decode()
                if uploaded >= "step00000009":
                    break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert uploaded is not None and uploaded < "step00000024", f"killed at {uploaded}"
        shutil.rmtree(run)  # the node's disk is gone
        resumed = subprocess.run(
            [*cmd, "--resume", "latest"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"{uploaded} fetched from {store}" in resumed.stderr
        fs.invalidate_cache()
        assert fs.cat_file("runs/tiny/checkpoints/latest").decode() == "step00000024"
        kept = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/tiny/checkpoints"))
        assert kept == ["latest", "step00000021", "step00000024"]  # (keep_last=2)
        # A fresh run into the store that holds this one is refused, naming the key.
        other = args(data, tmp_path / "other", f"train.remote_dir={store}")
        again = subprocess.run(
            [sys.executable, "-m", "setdiv.cli", *other], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        # ... and a store that refuses the credentials is an error naming the key.
        denied = run_setdiv(*other)
    assert denied.returncode == 2 and "config key 'train.remote_dir'" in denied.stderr
    assert again.returncode != 0 and "train.remote_dir" in again.stderr, again.stderr[-2000:]
    want, got = consolidated_weights(ref), consolidated_weights(run)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    resumed_losses, ref_losses = losses(run), losses(ref)
    assert [resumed_losses[s] for s in sorted(resumed_losses) if s > int(uploaded[4:])] == [
        ref_losses[s] for s in sorted(ref_losses) if s > int(uploaded[4:])
    ]


def _checkpoint(run: Path, tag: str, files: int = 3) -> None:
    d = run / "checkpoints" / tag
    d.mkdir(parents=True)
    for i in range(files):
        (d / f"part{i}.pt").write_bytes(f"{tag}/{i}".encode() * 100)
    (run / "checkpoints/latest").write_text(tag)
    (run / "config.yaml").write_text(f"at: {tag}\n")


def test_a_partial_upload_never_becomes_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store fails on the second file of step 2's upload (every retry): the remote latest
    stays on step 1, whose files a fetch restores whole; step 3 then uploads."""
    import time as time_mod

    monkeypatch.setattr(time_mod, "sleep", lambda s: None)  # (the retries' backoff)
    run, store = tmp_path / "run", (tmp_path / "store").as_uri()
    up = RemoteCheckpoints(store, run, keep_last=5)
    _checkpoint(run, "step00000001")
    up.submit("step00000001")
    up.flush()
    real = up.fs.put_file

    def failing(src: str, dst: str, **kw: object) -> None:
        if "step00000002/part1" in dst:
            raise ConnectionError("the store went away")
        real(src, dst, **kw)

    monkeypatch.setattr(up.fs, "put_file", failing)
    _checkpoint(run, "step00000002")
    with caplog.at_level(logging.ERROR, "setdiv.train.remote_store"):
        up.submit("step00000002")
        up.flush()
    assert "step00000002 not uploaded" in caplog.text
    assert remote_latest(store) == "step00000001"
    (tmp_path / "lost").mkdir()
    assert fetch_latest(store, tmp_path / "lost") == "step00000001"
    got = tmp_path / "lost/checkpoints/step00000001"
    assert sorted(p.name for p in got.iterdir()) == ["part0.pt", "part1.pt", "part2.pt"]
    assert (got / "part2.pt").read_bytes() == b"step00000001/2" * 100
    assert (tmp_path / "lost/config.yaml").read_text() == "at: step00000001\n"
    _checkpoint(run, "step00000003")
    up.submit("step00000003")
    up.flush()
    assert remote_latest(store) == "step00000003"
    assert up.uploaded == ["step00000001", "step00000003"]
    assert not (run / "checkpoints/.upload/step00000002").exists()  # (staging cleaned up)
