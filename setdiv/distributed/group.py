"""Joining and leaving a job: the process group, local spawning, stopping, failure agreement.

`process_group()` joins the job the environment describes (nccl on GPU, gloo on CPU) and leaves
it on exit; `run_ranks()` runs a job's entry point in this process (a lone process, or one
rank torchrun / srun started) or in N ranks it spawns here (`spawn_local`); `on_all_ranks()`
makes a failure on one rank a failure on all; `stop_on_sigterm()` turns a launcher's SIGTERM
into a clean stop. Train, eval, index build, the demo and the cluster jobs all go through these.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from setdiv.distributed.collectives import collective_device, is_initialized
from setdiv.distributed.jobs import (
    JOB_VARIABLES,
    Job,
    die_with_parent,
    free_port,
    job_from_env,
    pick_device,
)
from setdiv.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PeerFailedError",
    "RendezvousError",
    "Terminated",
    "leaving",
    "on_all_ranks",
    "process_group",
    "run_ranks",
    "spawn_local",
    "stop_on_sigterm",
]


class RendezvousError(RuntimeError):
    """The ranks of a job could not meet: the master address does not resolve, or not every
    rank arrived within the timeout. One line naming the address and port, exit code 4 (not a
    user error: a retry may succeed where a node came up late)."""

    exit_code = 4


DEFAULT_TIMEOUT_S = 300.0
"""How long ranks wait for each other at the rendezvous (`train.dist_timeout`)."""


def _resolve(job: Job) -> None:
    """Fail at once, naming it, when the master address does not resolve (torch would retry
    the lookup until its timeout, logging `gai error` lines)."""
    try:
        socket.getaddrinfo(job.master_addr, job.master_port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RendezvousError(
            f"rank {job.rank} of {job.world_size} ({job.launcher}): the master address "
            f"{job.master_addr!r} (port {job.master_port}) does not resolve ({exc.strerror}); "
            "the first node of the job must be resolvable from every node (DNS or /etc/hosts), "
            "or set MASTER_ADDR to an address that is"
        ) from None


@contextlib.contextmanager
def process_group(job: Job | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Job]:
    """Join `job` (default: `job_from_env()`) for the duration of the block: the rank's GPU
    is made current, RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* are exported (DeepSpeed reads
    them), and on exit the group is destroyed and the environment restored. Each rank of a job
    of several logs its place once; a master address that does not resolve, or peers that do
    not all arrive within `timeout_s`, raise `RendezvousError` naming the address and port."""
    job = job or job_from_env()
    if job.world_size > 1 and not job.master_port:
        raise UserError(
            f"rank {job.rank} of {job.world_size} ({job.launcher}): set MASTER_ADDR and "
            "MASTER_PORT so the ranks can meet"
        )
    device = pick_device(job)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if job.world_size > 1:  # a lone process meets nobody: nothing to say
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        log.info(
            "rank %d of %d, local rank %d, master %s:%d, launcher %s, %s on %s, node %s",
            job.rank, job.world_size, job.local_rank, job.master_addr, job.master_port,
            job.launcher, backend, device, node,
        )  # fmt: skip
        _resolve(job)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    saved = {k: os.environ.get(k) for k in JOB_VARIABLES}
    os.environ.update(
        RANK=str(job.rank),
        WORLD_SIZE=str(job.world_size),
        LOCAL_RANK=str(job.local_rank),
        MASTER_ADDR=job.master_addr,
        MASTER_PORT=str(job.master_port),
    )
    try:
        if job.world_size == 1:  # no rendezvous: an in-memory store
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, device_id=_bound(device)
            )
        else:
            _rendezvous(job, backend, timeout_s, device)
        yield job
        if is_initialized():
            dist.destroy_process_group()
    except BaseException:
        # A failing rank of a multi-process job leaves the group as it is: its process ends
        # with the error, and tearing the group down first would make the peers report a
        # broken connection before this rank could report its own error.
        if is_initialized() and job.world_size == 1:
            dist.destroy_process_group()
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bound(device: torch.device) -> torch.device | None:
    """The GPU to bind the group to (NCCL then need not guess it from the global rank)."""
    return device if device.type == "cuda" else None


def _rendezvous(job: Job, backend: str, timeout_s: float, device: torch.device) -> None:
    """Meet at the master's TCP store, every rank arriving within `timeout_s` (rank 0 waits
    for all the others to connect, the others retry connecting for as long), then form the
    group over it. Collectives keep torch's own (longer) timeout: a rank may legitimately wait
    minutes in one while rank 0 writes or scores."""
    try:
        store = dist.TCPStore(
            job.master_addr,
            job.master_port,
            job.world_size,
            is_master=job.rank == 0,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=True,
        )
    except (RuntimeError, OSError) as exc:  # torch's DistStoreError / DistNetworkError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousError(
            f"rank {job.rank} of {job.world_size} ({job.launcher}): the rendezvous at "
            f"{job.master_addr}:{job.master_port} did not complete within {timeout_s:g} s "
            f"({reason}); check that every rank started and can reach that address and port "
            "(train.dist_timeout sets the wait)"
        ) from None
    dist.init_process_group(
        backend, store=store, rank=job.rank, world_size=job.world_size, device_id=_bound(device)
    )


class PeerFailedError(RuntimeError):
    """Raised on the ranks whose peer failed first (see `on_all_ranks`)."""


class Terminated(SystemExit):
    """This rank was told to stop (SIGTERM: a Slurm requeue, preemption, cancel or time limit,
    a Ray trial stopped): it unwinds like an exit, with exit code 128 + 15."""


_stop_reason: list[str] = []
"""Why this rank is stopping, once it is (set by the SIGTERM handler or by a launcher)."""


@contextlib.contextmanager
def stop_on_sigterm(what: str = "training") -> Iterator[None]:
    """For the block, SIGTERM stops this rank cleanly: the first one raises `Terminated`
    where the rank is, which unwinds it (its data workers are shut down; nothing is saved: the
    newest complete checkpoint stays what a resume starts from). Whatever error the unwinding
    brings (a peer that left first breaks a collective) is reported as one line naming the
    reason, not as a traceback; later SIGTERMs are ignored while it stops. Off the main
    thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        if _stop_reason:
            return
        _stop_reason.append("SIGTERM (a requeue, preemption, time limit or cancel)")
        raise Terminated(128 + signum)

    _stop_reason.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except BaseException as exc:
        if not _stop_reason:
            raise
        log.warning(
            "%s stopped: %s; a resume continues from the newest complete checkpoint%s",
            what,
            _stop_reason[0],
            "" if isinstance(exc, SystemExit) else f" (while stopping: {type(exc).__name__})",
        )
        raise (exc if isinstance(exc, SystemExit) else Terminated(128 + signal.SIGTERM)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def leaving(reason: str) -> None:
    """This rank is leaving on its own (`reason`: a launcher's requeue handler has taken
    over). A SIGTERM from now on is the expected end: ignored here and by the children started
    from now on (SIG_IGN survives exec: submitit's `scontrol requeue` child must not die of the
    step's SIGTERM before it has requeued the job)."""
    if not _stop_reason:
        _stop_reason.append(reason)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _spawned(
    local_rank: int,
    fn: Callable[..., Any],
    nprocs: int,
    port: int,
    args: tuple,
    errors: Any,
    launcher: int,
) -> None:
    die_with_parent(signal.SIGTERM)  # a rank never outlives the process that spawned it
    if os.getppid() != launcher:  # it died before we asked
        raise SystemExit(1)
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        fn(*args)
    except Exception as exc:
        with contextlib.suppress(Exception):  # an unpicklable error: torch's traceback only
            errors.put(exc)
        raise


def _first_error(errors: Any) -> BaseException | None:
    """The first error a rank raised itself (not a `PeerFailedError` echo), else the first."""
    seen = []
    while not errors.empty():
        seen.append(errors.get())
    return next((e for e in seen if not isinstance(e, PeerFailedError)), seen[0] if seen else None)


def spawn_local(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run `fn(*args)` in `nprocs` new processes forming one job on this machine (a free
    port, ranks 0..nprocs-1 in RANK / WORLD_SIZE / LOCAL_RANK); `fn` joins it with
    `process_group()`. If a rank fails, the others are stopped and the rank's own exception is
    raised here (chained to torch's report, which holds the rank's traceback). The ranks die
    with this process, however it ends (SIGTERM, SIGKILL), so none is left behind."""
    errors = mp.get_context("spawn").SimpleQueue()
    job = (fn, nprocs, free_port(), args, errors, os.getpid())
    ctx = mp.start_processes(_spawned, args=job, nprocs=nprocs, join=False)
    try:
        while not ctx.join():
            pass
    except mp.ProcessRaisedException as exc:
        own = _first_error(errors)
        if own is None:
            raise
        raise own from exc
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def run_ranks(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """`fn(*args)` as a job of `nproc` ranks: here, in this process, when `nproc` is 1 (a lone
    process, or one rank of a job torchrun / srun / submitit started), else in `nproc` ranks
    spawned on this machine (`spawn_local`). `fn` joins the job with `process_group()`."""
    if nproc < 1:  # (the CLIs' `--nproc` is `positive_int`; this guards library calls)
        raise ValueError(f"a job needs at least one rank, got {nproc}")
    if nproc == 1:
        fn(*args)
    else:
        spawn_local(fn, nproc, *args)


def on_all_ranks(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every rank; if it raises anywhere, raise everywhere, so no rank is left
    waiting in a collective for a peer that has already failed."""
    error: BaseException | None = None
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 -- re-raised below, after the agreement
        error = exc
    if is_initialized() and dist.get_world_size() > 1:
        failed = torch.tensor([float(error is not None)], device=collective_device())
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise PeerFailedError(f"{what} failed on another rank (see that rank's error)")
    if error is not None:
        raise error
    return out
