"""The Ray flags of the cluster commands (`--address`, `--num-cpus`, `--num-gpus`; the session
itself: `setdiv.distributed.ray_session`), and waiting for a cluster's nodes."""

from __future__ import annotations

import argparse
import sys
import time

from setdiv import errors

__all__ = ["add_arguments", "main", "resource_bounds", "wait_for_nodes"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="join this Ray cluster (host:port or 'auto')")
    p.add_argument(
        "--num-cpus", type=int, default=None, help="local Ray: CPU slots (default: all cores)"
    )
    p.add_argument(
        "--num-gpus", type=int, default=None, help="local Ray: GPUs (default: all visible)"
    )


def resource_bounds(args: argparse.Namespace) -> dict[str, tuple[int | None, int]]:
    """The lowest values of the flags `add_arguments` adds (`setdiv.errors.check_at_least`)."""
    return {"--num-cpus": (args.num_cpus, 1), "--num-gpus": (args.num_gpus, 0)}


def wait_for_nodes(address: str, nodes: int, timeout_s: float) -> int:
    """Wait until `nodes` Ray nodes of the cluster at `address` are alive (or `timeout_s`
    passed); returns how many are. Used by cluster/ray_slurm.sbatch before it starts the
    driver, so that Tune places trials on every node from the first one on."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes or time.monotonic() > deadline:
                return alive
            time.sleep(1.0)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m setdiv_cluster.ray_cluster wait ADDRESS NODES [--timeout S]`: exit 0 once NODES
    nodes are up, 1 (with a line saying how many) after the timeout."""
    p = errors.ArgumentParser(prog="python -m setdiv_cluster.ray_cluster")
    p.add_argument("command", choices=("wait",))
    p.add_argument("address", help="HEAD_IP:PORT")
    p.add_argument("nodes", type=int, help="nodes to wait for")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds")
    args = p.parse_args(argv)
    alive = wait_for_nodes(args.address, args.nodes, args.timeout)
    if alive < args.nodes:
        print(
            f"only {alive} of {args.nodes} Ray nodes joined {args.address} within "
            f"{args.timeout:g} s",
            file=sys.stderr,
        )
        return 1
    print(f"{alive} Ray nodes up at {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
