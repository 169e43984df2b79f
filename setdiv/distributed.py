"""Where this process sits in the job: rank and world size from torchrun, SLURM or defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["WorldInfo", "world_info"]


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
