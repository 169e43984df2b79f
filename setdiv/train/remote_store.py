"""A run's checkpoints copied to a remote store (`train.remote_dir`, any fsspec URL: `s3://`,
`gs://`, a `file://` folder on shared storage), so that a job survives losing its node's disk.

    REMOTE/checkpoints/step00001234/...   the files of a complete checkpoint
    REMOTE/checkpoints/latest             its tag, written after all of them
    REMOTE/config.yaml, vocab.json, metrics.jsonl   as they were when it was taken

Rank 0 hands each step checkpoint over once `latest` points at it locally: its files are
hard-linked (copied where links cannot be made) into `checkpoints/.upload/TAG`, which takes
less than writing them did, and a background thread uploads them, then the run files, then
writes the remote `latest`, then deletes the remote step checkpoints past `train.keep_last`.
A partial upload is therefore never `latest`. While one upload runs, only the newest
checkpoint waits; an older one waiting is dropped. A failed upload is retried, then warned
about; training goes on and the next checkpoint tries again. Training waits for the last
upload at its end. `best` stays local.

`--resume latest` in a run directory without a checkpoint fetches the remote `latest` first
(`fetch_latest`). The run directory is assumed to be one node's or shared by the job's nodes:
rank 0 uploads what it sees. docs/reliability.md "Checkpoints in a remote store".
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from setdiv.errors import UserError
from setdiv.paths import RunFiles

__all__ = ["RemoteCheckpoints", "clear_remote", "fetch_latest", "remote_fs", "remote_latest"]

log = logging.getLogger(__name__)
UPLOAD_DIR = ".upload"
CKPTS = RunFiles(Path()).checkpoints.name
"""The checkpoints folder, named in the store as in the run directory."""
ATTEMPTS = 3


def remote_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) of `train.remote_dir`; a clear error naming the key when no
    filesystem serves the URL (e.g. s3:// without s3fs installed)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UserError(f"config key 'train.remote_dir' = {url!r}: {exc}") from None


def _run_files(run_dir: Path) -> list[Path]:
    files = RunFiles(run_dir)
    return [files.config, files.vocab, files.metrics]


def _retried(what: str, op: Any, *args: Any) -> None:
    for attempt in range(ATTEMPTS):
        try:
            op(*args)
            return
        except Exception as exc:  # noqa: BLE001 -- a store's errors are many; all retried
            if attempt == ATTEMPTS - 1:
                raise
            log.warning("%s failed (%s: %s); retrying", what, type(exc).__name__, exc)
            time.sleep(2**attempt)


class RemoteCheckpoints:
    """Background uploads of one run's step checkpoints (module docstring)."""

    def __init__(self, url: str, run_dir: Path, keep_last: int) -> None:
        self.url, self.run_dir, self.keep_last = url.rstrip("/"), Path(run_dir), keep_last
        self.fs, self.root = remote_fs(self.url)
        self.staging = RunFiles(self.run_dir).checkpoints / UPLOAD_DIR
        self._pending: str | None = None
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.uploaded: list[str] = []
        """Tags whose upload completed (remote `latest` pointed at them), in order."""

    def submit(self, tag: str) -> None:
        """Stage checkpoint `tag` (just made `latest` locally) and queue its upload."""
        source = RunFiles(self.run_dir).checkpoints / tag
        target = self.staging / tag
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target / "checkpoint", copy_function=_link_or_copy)
        for f in _run_files(self.run_dir):
            if f.is_file():
                shutil.copy2(f, target / f.name)  # (small; metrics.jsonl keeps growing)
        with self._cond:
            if self._pending is not None:  # (superseded before its upload began)
                shutil.rmtree(self.staging / self._pending, ignore_errors=True)
            self._pending = tag
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="ckpt-upload", daemon=True)
                self._thread.start()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted checkpoint is uploaded (or its upload gave up)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None)
                tag, self._pending, self._busy = self._pending, None, True
            try:
                self._upload(tag)
                self.uploaded.append(tag)
            except Exception as exc:  # noqa: BLE001 -- training goes on; the next one retries
                log.error(
                    "train.remote_dir: checkpoint %s not uploaded to %s (%s: %s); the remote "
                    "latest stays on the previous one", tag, self.url, type(exc).__name__, exc,
                )  # fmt: skip
            finally:
                shutil.rmtree(self.staging / tag, ignore_errors=True)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _put(self, src: Path, dst: str) -> None:
        self.fs.makedirs(dst.rpartition("/")[0], exist_ok=True)  # (a folder store needs it)
        self.fs.put_file(str(src), dst)

    def _upload(self, tag: str) -> None:
        start, staged = time.perf_counter(), self.staging / tag
        remote_ckpt = f"{self.root}/{CKPTS}/{tag}"
        for f in sorted(p for p in (staged / "checkpoint").rglob("*") if p.is_file()):
            rel = f.relative_to(staged / "checkpoint").as_posix()
            _retried(f"upload of {f.name}", self._put, f, f"{remote_ckpt}/{rel}")
        for f in sorted(p for p in staged.iterdir() if p.is_file()):
            _retried(f"upload of {f.name}", self._put, f, f"{self.root}/{f.name}")
        latest = f"{self.root}/{CKPTS}/latest"
        _retried("writing the remote latest", self.fs.pipe_file, latest, tag.encode())
        self._prune()
        log.info("train.remote_dir: %s uploaded in %.1f s", tag, time.perf_counter() - start)

    def _prune(self) -> None:
        try:
            listed = self.fs.ls(f"{self.root}/{CKPTS}", detail=False)
        except FileNotFoundError:
            return
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]
        steps = sorted(n for n in names if n.startswith("step"))
        for old in steps[: max(len(steps) - self.keep_last, 0)]:
            self.fs.rm(f"{self.root}/{CKPTS}/{old}", recursive=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def remote_latest(url: str) -> str | None:
    """The tag of the remote `latest`, or None when the store holds no checkpoint."""
    fs, root = remote_fs(url.rstrip("/"))
    try:
        return fs.cat_file(f"{root}/{CKPTS}/latest").decode().strip()
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 -- credentials, endpoint, network: say which key
        raise UserError(
            f"config key 'train.remote_dir': cannot read {url}: {type(exc).__name__}: {exc}"
        ) from None


def clear_remote(url: str) -> None:
    """Delete the run files and checkpoints an earlier run left at `url` (`--overwrite`)."""
    fs, root = remote_fs(url.rstrip("/"))
    for name in (CKPTS, *(f.name for f in _run_files(Path()))):
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)


def fetch_latest(url: str, run_dir: Path) -> str | None:
    """Download the remote `latest` checkpoint (and the run files next to it) into `run_dir`,
    which holds none; returns its tag, or None when the store holds no checkpoint."""
    fs, root = remote_fs(url.rstrip("/"))
    tag = remote_latest(url)
    if tag is None:
        return None
    files = RunFiles(run_dir)
    local = files.checkpoints / tag
    partial = files.checkpoints / f"{tag}.fetching"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    remote_ckpt = f"{root}/{CKPTS}/{tag}"
    for path in fs.find(remote_ckpt):
        rel = path[len(remote_ckpt.rstrip("/")) :].lstrip("/")
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(partial / rel))
    for f in _run_files(run_dir):
        if not f.exists() and fs.exists(f"{root}/{f.name}"):
            fs.get_file(f"{root}/{f.name}", str(f))
    shutil.rmtree(local, ignore_errors=True)
    os.replace(partial, local)
    (files.checkpoints / "latest.tmp").write_text(tag)
    os.replace(files.checkpoints / "latest.tmp", files.checkpoints / "latest")
    log.info("--resume latest: %s fetched from %s in %.1f s", tag, url, time.perf_counter() - start)
    return tag
