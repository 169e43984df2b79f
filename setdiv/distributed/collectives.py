"""Collectives over the current process group, each a no-op for a lone process (world size 1
or no group): gathers (rows, Python lists, differentiable), sums (plain, differentiable), a
broadcast, rank queries. The differentiable ones are torch's functional collectives, whose
autograd backward works on gloo and nccl alike."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

__all__ = [
    "all_gather_list",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "all_reduce_sum_with_grad",
    "broadcast_float",
    "collective_device",
    "is_initialized",
    "is_rank_zero",
    "rank_and_world",
]


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
    device = collective_device()
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
    # the functional collective's backward is a reduce-scatter (sum) of the gathered gradient
    return fc.wait_tensor(fc.all_gather_single(t.contiguous(), 0, dist.group.WORLD))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_rank_zero(rank: int | None = None) -> bool:
    """Whether this process does the job's one-off work (logs, files, progress bars): `rank`
    when given (a `Job.rank`, a trainer's rank), else the process group's (True without one)."""
    return (rank_and_world()[0] if rank is None else rank) == 0


def collective_device() -> torch.device:
    """Where collectives need their tensors: the current GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_with_grad(t: Tensor) -> Tensor:
    """Sum of `t` over ranks (same shape), differentiably: the backward pass sums the
    gradient over ranks too, so statistics summed over ranks (a synchronised BatchNorm's)
    back-propagate like the whole batch's. World size 1 (or no process group) returns `t`."""
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    return fc.wait_tensor(fc.all_reduce(t.contiguous(), "sum", dist.group.WORLD))


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a copy on t's device; world size 1 returns `t`), without gradient."""
    if not is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.detach().to(collective_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def broadcast_float(value: float, src: int = 0) -> float:
    """`value` as rank `src` has it, on every rank."""
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.broadcast(t, src=src)
    return float(t[0])
