"""A rank's data workers and the job's signals: workers ignore them (they are the rank's
business), never outlive their rank, and are forked with the signals blocked; the rank defers
its own handlers while workers start and stop (`setdiv.data.reader` uses these)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

from setdiv.distributed.jobs import die_with_parent

T = TypeVar("T")

__all__ = ["JOB_SIGNALS", "data_worker_init", "deferred_job_signals", "start_data_workers"]


JOB_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
"""What a launcher sends a job step: termination, and the requeue signals."""


def data_worker_init(_worker_id: int, rank_pid: int | None = None) -> None:
    """`worker_init_fn` of a rank's DataLoader. Data workers are forked from their rank and
    would inherit its signal handlers (a launcher's requeue handler on USR1/USR2, the rank's
    SIGTERM handler). The job signals are the rank's business: a launcher sends them to every
    process of the job step (Slurm's SIGTERM at a requeue or cancel reaches the workers too),
    and a worker that died of one would make its rank fail with `DataLoader worker ... killed`
    instead of stopping cleanly. So a worker ignores them all, and ends when its rank shuts it
    down or dies: it never outlives its rank (an orphan would block for ever on its full result
    pipe), the kernel kills it then, and if the rank died before the kernel was asked to
    (`rank_pid` is no longer the parent), the worker ends now. The rank forks with these
    signals blocked (`start_data_workers`); one that arrived in between is discarded here."""
    die_with_parent(signal.SIGKILL)
    if rank_pid is not None and os.getppid() != rank_pid:
        os._exit(1)
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)


@contextlib.contextmanager
def deferred_job_signals() -> Iterator[None]:
    """Hold the job signals' Python handlers back for the block, then run those that arrived.
    Starting and freeing data worker processes runs multiprocessing finalisers, and what a
    handler raises there (submitit's requeue exits) would be swallowed; after the block it
    reaches the caller. (Masking the main thread is not enough: another thread may take the
    signal and the main thread still runs the handler.) Off the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {s: h for s in JOB_SIGNALS if callable(h := signal.getsignal(s))}
    for sig in held:
        signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def start_data_workers(loader: Iterable[T]) -> Iterator[T]:
    """`iter(loader)` with the job signals blocked while its workers are forked, so none runs
    an inherited handler before `data_worker_init`, and their handlers deferred in the rank
    (`deferred_job_signals`); the rank gets any held back right after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        with deferred_job_signals():
            return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
