"""Ray for the length of a block: a throw-away local Ray with explicit resources and a short
temp dir of its own, or a running cluster joined (`address`, e.g. the one
`cluster/ray_slurm.sbatch` starts, or `ray start` on several machines).

Token authentication (Ray >= 2.59) follows the environment: RAY_AUTH_MODE=token with the token
in ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH; a local Ray started without RAY_AUTH_MODE gets a
generated token (Ray's default). See docs/cluster.md. Ray is imported only here, when used.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

__all__ = ["ray_session"]


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None, num_gpus: int | None) -> Iterator[None]:
    """Ray for the duration of the block; a local one is shut down and its files removed."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
        return
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    # Unix socket paths are limited to 107 bytes: keep the session dir short.
    temp = tempfile.mkdtemp(prefix="sdray", dir="/tmp")
    try:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            num_gpus=num_gpus,
            include_dashboard=False,
            _temp_dir=temp,
            log_to_driver=False,
        )
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
