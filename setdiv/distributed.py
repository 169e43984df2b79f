"""Where this process sits in the job: rank and world size from torchrun, SLURM or defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "WorldInfo",
    "all_gather_list",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "rank_and_world",
    "init_distributed",
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


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    rank: int, world_size: int, init_method: str, backend: str | None = None
) -> None:
    """Join the process group: nccl when CUDA is available, gloo otherwise."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate each rank's (n_r, ...) tensor along dim 0 in rank order (n_r may differ).

    World size 1 (or no process group) returns `t` unchanged.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


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


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a copy; world size 1 returns `t`), without gradient."""
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out
