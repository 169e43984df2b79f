"""Where this process sits in the job: rank and world size from torchrun, SLURM or defaults."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "broadcast_float",
    "free_port",
    "on_all_ranks",
    "WorldInfo",
    "all_gather_list",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "rank_and_world",
    "init_distributed",
    "rendezvous_address",
    "is_initialized",
    "world_info",
]


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int


def world_info() -> WorldInfo:
    """Rank / world size / local rank from `RANK`/`WORLD_SIZE`/`LOCAL_RANK` (torchrun), else
    `SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    return WorldInfo(rank, world, local)


def rendezvous_address() -> tuple[str, str] | None:
    """(MASTER_ADDR, MASTER_PORT): from the environment (torchrun), else derived under SLURM
    (the node srun launched from, and a port fixed by the job id, so every task agrees);
    None when neither says."""
    env = os.environ
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"], env.get("MASTER_PORT", "29500")
    if "SLURM_LAUNCH_NODE_IPADDR" in env and "SLURM_JOB_ID" in env:
        return env["SLURM_LAUNCH_NODE_IPADDR"], str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    rank: int, world_size: int, init_method: str, backend: str | None = None
) -> None:
    """Join the process group: nccl when CUDA is available, gloo otherwise."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


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
            raise RuntimeError(f"{what} failed on another rank (see that rank's error)")
    if error is not None:
        raise error
    return out
