"""Who may train into a run directory, and with which config.

    RUN/train.lock     {"pid", "host", "start", "job", "since"} of the training that owns RUN

A run directory holds a run once it has checkpoints or training records. `claim()` lets a
training in only when it is the one owner (a lock file, written atomically; a lock whose
process is gone -- same host, pid dead or reused -- or which an earlier attempt of the same
cluster job left behind is stale and taken over), when it resumes a run with the config that
run was started with (or starts one where there is none), or when it was told to overwrite.
Everything is checked before anything in RUN is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from setdiv import config as config_lib
from setdiv.errors import UserError
from setdiv.paths import RunFiles
from setdiv.train.remote_store import clear_remote, fetch_latest, remote_latest

__all__ = [
    "RESUME_MAY_CHANGE",
    "RunDirError",
    "check_resume_config",
    "check_start",
    "claim",
    "holds_run",
]

log = logging.getLogger(__name__)

RESUME_MAY_CHANGE = frozenset(
    {
        "train.log_every",
        "train.ckpt_every",
        "train.keep_last",
        "train.max_nonfinite",
        "train.dist_timeout",
        "data.eval_batch_size",
    }
)
"""Config keys a resume may change: how often to log and save, not what is trained or how."""


class RunDirError(UserError):
    """The run directory cannot be trained into as asked (a user error: exit code 2)."""


def holds_run(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds (part of) a training run: a checkpoint or a training record.
    What a training that failed before it recorded anything leaves (`tb/`, an empty
    `metrics.jsonl` or `checkpoints/`) is no run: a plain retry may start there."""
    run = RunFiles(run_dir)  # (a config.yaml alone is no run: `cluster/submit.py` writes it)
    ckpts, records = run.checkpoints, run.metrics
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return True
    return records.is_file() and records.stat().st_size > 0


def _clear(paths: tuple[Path, ...]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _flat(cfg: config_lib.Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    visit(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


def check_resume_config(cfg: config_lib.Config, run_dir: str | Path) -> None:
    """Raise `RunDirError` if `cfg` differs from the config RUN was trained with in a key a
    resume may not change (see `RESUME_MAY_CHANGE`), listing each key's old and new value."""
    saved = RunFiles(run_dir).config
    if not saved.is_file():
        return
    old, new = _flat(config_lib.load([saved])), _flat(cfg)
    changed = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k)
    ]
    if changed:
        raise RunDirError(
            f"--resume: the config differs from the one {saved} was trained with in "
            f"{len(changed)} key(s): "
            + "; ".join(changed[:8])
            + ("; ..." * (len(changed) > 8))
            + f". Resume with that config (only {sorted(RESUME_MAY_CHANGE)} may change), or "
            "train into a new --run-dir"
        )


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def _start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot; Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_ticks(pid)
    return start is None or now is None or now == start


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "start": _start_ticks(pid),
        "job": _job_id(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _stale(owner: dict[str, Any]) -> bool:
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner["pid"]), owner.get("start"))
    # Another host's process cannot be checked from here, unless it was an earlier attempt of
    # this same (requeued) cluster job: that one has ended.
    return owner.get("job") is not None and owner.get("job") == _job_id()


def _acquire(run_dir: Path) -> Path:
    """Create RUN/train.lock atomically (write a private file, then hard-link it into place:
    the link fails if a lock exists); a stale lock is replaced, a live one is an error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, me = RunFiles(run_dir).lock, _owner()
    tmp = lock.with_name(f".{lock.name}.{me['pid']}")
    tmp.write_text(json.dumps(me) + "\n")
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)
                return lock
            except FileExistsError:
                try:
                    owner = json.loads(lock.read_text())
                except (OSError, ValueError):
                    owner = {}
                if owner and not _stale(owner):
                    raise RunDirError(
                        f"{run_dir} is being trained by pid {owner.get('pid')} on host "
                        f"{owner.get('host')} (since {owner.get('since')}; lock {lock}). Wait "
                        "for it, or train into another --run-dir; if that process is gone "
                        "(e.g. its node died), delete the lock file"
                    ) from None
                log.warning("%s: taking over the stale lock of %s", run_dir, owner or "nobody")
                lock.unlink(missing_ok=True)
        raise RunDirError(f"{lock}: another training claimed {run_dir} at the same time")
    finally:
        tmp.unlink(missing_ok=True)


def _release(lock: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()


def check_start(
    run_dir: str | Path, cfg: config_lib.Config, resume: str | None, overwrite: bool = False
) -> None:
    """Whether a training may start in `run_dir` as asked, for everyone who asks (`setdiv
    train` at its start, `cluster/submit.py` before it queues anything); raises `RunDirError`:
    - `resume` and `overwrite` together contradict each other;
    - no `resume`: RUN must hold no run (`holds_run`), unless `overwrite`;
    - `resume` into a run: the config must match the run's (`check_resume_config`); a resume
      into a directory that holds no run starts one."""
    if resume is not None and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if resume is None and holds_run(run_dir) and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run: pass --resume latest to continue it, "
            "--overwrite to delete it and start again, or choose another --run-dir"
        )
    if resume is not None and holds_run(run_dir):
        check_resume_config(cfg, run_dir)


@contextlib.contextmanager
def claim(
    run_dir: str | Path, cfg: config_lib.Config, resume: str | None, overwrite: bool = False
) -> Iterator[None]:
    """Own `run_dir` for a training (rank 0 of the job calls this): take its lock, then
    `check_start` (`--resume latest` with `train.remote_dir` and no local checkpoint fetches
    the remote latest first); with `overwrite`, the run's checkpoints, records, TensorBoard
    logs, config, vocabulary and export are deleted. Raises `RunDirError` before writing
    anything else; the lock is released on exit."""
    run_dir = Path(run_dir)
    if resume is not None and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    lock = _acquire(run_dir)
    try:
        remote = cfg.train.remote_dir
        local = (RunFiles(run_dir).checkpoints / "latest").exists()
        if resume == "latest" and remote and not local:
            log.info("--resume latest: no checkpoint in %s, looking in %s", run_dir, remote)
            fetch_latest(remote, run_dir)
        check_start(run_dir, cfg, resume, overwrite)
        if remote and resume is None and remote_latest(remote) is not None:
            if not overwrite:
                raise RunDirError(
                    f"config key 'train.remote_dir': {remote} holds another run's checkpoints: "
                    "pass --resume latest to continue it, --overwrite to delete it, or choose "
                    "another remote_dir"
                )
            log.warning("--overwrite: deleting the run in %s", remote)
            clear_remote(remote)
        held = holds_run(run_dir)
        if overwrite and held:
            log.warning("--overwrite: deleting the run in %s", run_dir)
            _clear(RunFiles(run_dir).written)
        elif not held and any(p.exists() for p in RunFiles(run_dir).marks):
            log.info("%s: clearing what a training that recorded nothing left there", run_dir)
            _clear(RunFiles(run_dir).marks)
        yield
    finally:
        _release(lock)
