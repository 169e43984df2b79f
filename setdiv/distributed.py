"""Where this process sits in its job, and the one way setdiv joins (and leaves) a job.

`job_from_env()` reads the job from the environment, whoever launched it:

    launcher         variables read
    spawn/torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    slurm (srun)     SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST (first host
                     is the master) or SLURM_JOB_NODELIST, SLURM_JOB_ID (fixes the port)
    submitit-local   SUBMITIT_LOCAL_GLOBALID, SUBMITIT_LOCAL_NTASKS, SUBMITIT_LOCAL_LOCALID,
                     SUBMITIT_LOCAL_JOB_ID (submitit's local executor: one node, 127.0.0.1)
    single           nothing set: one process

`process_group()` joins that job (nccl on GPU, gloo on CPU) and leaves it on exit;
`spawn_local()` starts N ranks of a job on this machine; `pick_device()` is the one place a
rank's device is chosen (by local rank among the GPUs the launcher left visible). Train,
eval, the demo and the cluster jobs all go through these.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from setdiv.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)

__all__ = [
    "Job",
    "PeerFailedError",
    "RendezvousError",
    "Terminated",
    "all_gather_list",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "broadcast_float",
    "cpu_threads",
    "data_worker_init",
    "deferred_job_signals",
    "die_with_parent",
    "expand_hostlist",
    "free_port",
    "is_initialized",
    "is_rank_zero",
    "job_from_env",
    "leaving",
    "limit_cpu_threads",
    "log_as_rank",
    "on_all_ranks",
    "pick_device",
    "process_group",
    "rank_and_world",
    "spawn_local",
    "start_data_workers",
    "stop_on_sigterm",
]

JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What `process_group` exports for DeepSpeed and torch (and restores on exit)."""


@dataclass(frozen=True)
class Job:
    """One process's place in a job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    """0: none known (a single process needs no rendezvous)."""
    launcher: str = "single"
    """spawn/torchrun | slurm | submitit-local | single"""

    @classmethod
    def single(cls) -> Job:
        return cls(0, 1, 0)


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, expanded: `"gpu[01-03,7],cpu1"` -> gpu01 gpu02 gpu03 gpu7
    cpu1 (zero padding kept; several bracket groups per name allowed)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(hostlist + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            if hostlist[start:i]:
                items.append(hostlist[start:i])
            start = i + 1
    hosts: list[str] = []
    for item in items:
        m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
        if m is None:
            hosts.append(item)
            continue
        head, ranges, tail = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                rests = expand_hostlist(tail) if tail else [""]
                hosts += [f"{head}{n:0{len(lo)}d}{rest}" for rest in rests]
    return hosts


def _port_for(job_id: str) -> int:
    """A rendezvous port every task of a job derives alike (20000-39999: clear of Ray's
    default worker ports)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def job_from_env(env: Mapping[str, str] | None = None) -> Job:
    """The job this process belongs to, read from `env` (default: `os.environ`); see the
    module docstring for the variables. MASTER_ADDR / MASTER_PORT, when set, always win."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, launcher = _int(env, "RANK"), _int(env, "WORLD_SIZE"), "spawn/torchrun"
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "0")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, launcher = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), "slurm"
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        first = expand_hostlist(nodes)[0] if nodes else "127.0.0.1"
        addr = env.get("MASTER_ADDR", first)
        port = env.get("MASTER_PORT") or str(_port_for(env.get("SLURM_JOB_ID", "0")))
    elif "SUBMITIT_LOCAL_GLOBALID" in env:
        rank, local = _int(env, "SUBMITIT_LOCAL_GLOBALID"), _int(env, "SUBMITIT_LOCAL_LOCALID")
        world, launcher = _int(env, "SUBMITIT_LOCAL_NTASKS"), "submitit-local"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = env.get("MASTER_PORT") or str(_port_for(env.get("SUBMITIT_LOCAL_JOB_ID", "0")))
    else:
        return Job.single()
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} outside world of size {world} ({launcher})")
    return Job(rank, world, local, addr, int(port) if world > 1 else 0, launcher)


def pick_device(job: Job | None = None) -> torch.device:
    """This rank's device: GPU `local_rank` modulo the GPUs visible (CUDA_VISIBLE_DEVICES as
    the launcher set it, whether a task sees one GPU or the whole node), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    job = job or job_from_env()
    return torch.device("cuda", job.local_rank % torch.cuda.device_count())


def cpu_threads(num_workers: int, environ: Mapping[str, str] | None = None) -> int | None:
    """Intra-op threads for a CPU rank: the cores this process may use, shared by the ranks
    on this machine and their data workers, at least 1; None when OMP_NUM_THREADS is set (the
    user decided). OpenMP threads spin-wait: with more busy threads than cores, a step of many
    small ops can take 30x longer (measured: 0.14 s vs 5 s per demo step on 2 cores)."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or 1)
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // max(local, 1) - num_workers)


def limit_cpu_threads(device: torch.device, num_workers: int) -> None:
    """On the CPU, set torch's intra-op threads to `cpu_threads` (a GPU rank is left alone)."""
    n = cpu_threads(num_workers) if device.type == "cpu" else None
    if n is not None and n != torch.get_num_threads():
        log.info("CPU rank: %d intra-op thread(s) (%d data workers)", n, num_workers)
        torch.set_num_threads(n)


def log_as_rank(job: Job) -> None:
    """INFO logging to stderr, each line prefixed with the job rank (replaces any setup)."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank {job.rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerFailedError(RuntimeError):
    """Raised on the ranks whose peer failed first (see `on_all_ranks`)."""


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when the thread that started it ends, even
    if its parent is killed outright (Linux; a no-op elsewhere). Safe between fork and exec:
    no Python locks are taken."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig))


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


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate each rank's (n_r, ...) tensor along dim 0 in rank order (n_r may differ, and
    may be 0 on a rank that had no data; its trailing shape is then taken from the others).

    World size 1 (or no process group) returns `t` unchanged.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    shapes: list = [None] * world
    dist.all_gather_object(shapes, tuple(t.shape))
    trailing = next((s[1:] for s in shapes if s[0] > 0), tuple(t.shape[1:]))
    longest = max(s[0] for s in shapes)
    device = _collective_device()
    padded = torch.zeros((longest, *trailing), dtype=t.dtype, device=device)
    if t.shape[0]:
        padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: s[0]] for p, s in zip(parts, shapes, strict=True)]).to(t.device)


def all_gather_list(items: list) -> list:
    """Concatenate each rank's Python list in rank order (world size 1: unchanged)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for p in parts for x in p]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate every rank's (n, ...) tensor (equal n) along dim 0, differentiably: the
    backward pass sums each slice's gradient over ranks and hands every rank its own slice's
    total, so a loss split over ranks back-propagates exactly like the whole-batch loss.

    World size 1 (or no process group) returns `t` unchanged.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_rank_zero(rank: int | None = None) -> bool:
    """Whether this process does the job's one-off work (logs, files, progress bars): `rank`
    when given (a `Job.rank`, a trainer's rank), else the process group's (True without one)."""
    return (rank_and_world()[0] if rank is None else rank) == 0


def _collective_device() -> torch.device:
    """Where collectives need their tensors: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a copy on t's device; world size 1 returns `t`), without gradient."""
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.detach().to(_collective_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def broadcast_float(value: float, src: int = 0) -> float:
    """`value` as rank `src` has it, on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=src)
    return float(t[0])


def on_all_ranks(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every rank; if it raises anywhere, raise everywhere, so no rank is left
    waiting in a collective for a peer that has already failed."""
    error: BaseException | None = None
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 -- re-raised below, after the agreement
        error = exc
    if is_initialized() and dist.get_world_size() > 1:
        failed = torch.tensor([float(error is not None)], device=_collective_device())
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise PeerFailedError(f"{what} failed on another rank (see that rank's error)")
    if error is not None:
        raise error
    return out
