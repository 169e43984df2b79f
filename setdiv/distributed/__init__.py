"""Distributed jobs, as nouns: `jobs` (where a process sits in its job, its device and
threads, the rank-count flag; imports no torch), `group` (joining, spawning, stopping, failure
agreement; `run_ranks` is how train, eval and index build start), `collectives`. A rank's data
workers and signals live with the reader (`setdiv.data.workers`).

Every public name is importable from here (`from setdiv.distributed import process_group`);
a submodule is imported on first use, so `setdiv.distributed.jobs` alone stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **dict.fromkeys(
        ["JOB_VARIABLES", "Job", "add_nproc_argument", "cpu_threads", "die_with_parent",
         "expand_hostlist", "free_port", "job_from_env", "limit_cpu_threads", "log_as_rank",
         "pick_device"],
        "jobs",
    ),
    **dict.fromkeys(
        ["DEFAULT_TIMEOUT_S", "PeerFailedError", "RendezvousError", "Terminated", "leaving",
         "on_all_ranks", "process_group", "run_ranks", "spawn_local", "stop_on_sigterm"],
        "group",
    ),
    **dict.fromkeys(
        ["all_gather_list", "all_gather_rows", "all_gather_with_grad", "all_reduce_sum",
         "all_reduce_sum_with_grad",
         "broadcast_float", "collective_device", "is_initialized", "is_rank_zero",
         "rank_and_world"],
        "collectives",
    ),
}  # fmt: skip

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'setdiv.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"setdiv.distributed.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
