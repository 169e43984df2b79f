"""Where this process sits in its job: job discovery, device and thread choice.

`job_from_env()` reads the job from the environment, whoever launched it:

    launcher         variables read
    spawn/torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    slurm (srun)     SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST (first host
                     is the master) or SLURM_JOB_NODELIST, SLURM_JOB_ID (fixes the port)
    submitit-local   SUBMITIT_LOCAL_GLOBALID, SUBMITIT_LOCAL_NTASKS, SUBMITIT_LOCAL_LOCALID,
                     SUBMITIT_LOCAL_JOB_ID (submitit's local executor: one node, 127.0.0.1)
    single           nothing set: one process

`pick_device()` is the one place a rank's device is chosen (by local rank among the GPUs the
launcher left visible); `add_nproc_argument()` is the one rank-count flag of every CLI. This
module imports no torch at import time: launchers (cluster scripts, sweep drivers) use it.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from setdiv.errors import UserError, positive_int

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "JOB_VARIABLES",
    "Job",
    "child_env",
    "is_job_variable",
    "setdiv_command",
    "add_nproc_argument",
    "cpu_threads",
    "die_with_parent",
    "expand_hostlist",
    "free_port",
    "job_from_env",
    "limit_cpu_threads",
    "log_as_rank",
    "pick_device",
]

JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What `process_group` exports for DeepSpeed and torch (and restores on exit)."""

JOB_VARIABLE_PREFIXES = ("SLURM_", "SLURMD_", "SRUN_", "SBATCH_", "SUBMITIT_", "TORCHELASTIC_")
INHERITED_JOB_VARIABLES = (*JOB_VARIABLES, "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
"""What describes a running job, and what a new job must not inherit from the one it is
started in: the variables `process_group` exports, plus torchrun's others (with the prefixes,
submitit's `clean_env` list). `SBATCH_*` would override the script's own `#SBATCH` lines."""
SITE_VARIABLES = ("SLURM_CONF", "SLURM_DEBUG_FLAGS")
"""Kept, although they start with SLURM_: where the site's Slurm configuration is (a site
that points at it only through SLURM_CONF cannot submit without it)."""


def is_job_variable(name: str) -> bool:
    """Whether `name` describes the job this process runs in (`INHERITED_JOB_VARIABLES`)."""
    return name not in SITE_VARIABLES and (
        name.startswith(JOB_VARIABLE_PREFIXES) or name in INHERITED_JOB_VARIABLES
    )


def setdiv_command(*args: str) -> list[str]:
    """`setdiv ARGS...` with this interpreter."""
    return [sys.executable, "-m", "setdiv.cli", *args]


def child_env(threads: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) without any job's rank / rendezvous
    variables, so a child starts a job of its own; CUDA_VISIBLE_DEVICES (set by Ray or SLURM
    for this worker) is kept. `threads` sets OMP_NUM_THREADS."""
    env = {
        k: v for k, v in (os.environ if base is None else base).items() if not is_job_variable(k)
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


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
    import torch

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
    import torch

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when the thread that started it ends, even
    if its parent is killed outright (Linux; a no-op elsewhere). Safe between fork and exec:
    no Python locks are taken."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig))


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new one's destination, with a warning."""

    def __init__(self, *args: Any, new: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        warnings.warn(
            f"{option_string} is deprecated and will be removed in the next release: "
            f"use {self.new}",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, values)


def add_nproc_argument(
    parser: argparse.ArgumentParser, help: str, deprecated: Sequence[str] = ()
) -> None:
    """`--nproc N` (ranks on this machine, default 1): the one spelling of the rank-count flag
    in every setdiv CLI. `deprecated`: its old spellings, still accepted for one release with
    a `FutureWarning` naming the new one, and hidden from `--help`."""
    parser.add_argument("--nproc", type=positive_int, default=1, metavar="N", help=help)
    for old in deprecated:
        parser.add_argument(
            old, type=positive_int, dest="nproc", action=_Deprecated, new="--nproc",
            help=argparse.SUPPRESS,
        )  # fmt: skip
