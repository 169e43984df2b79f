"""`setdiv serve INDEX --ray`: the index shards of a sharded index (`sharded.py`) as Ray Serve
deployments, one replica each, and this process as the router serving today's HTTP API.

Each shard is its own deployment (`setdiv-shard-000`, ...), one replica holding one
`IndexShard` (its elements, FAISS indexes and items), placed by Ray wherever the cluster has
the CPUs it asks for. The router encodes queries with the export, fans each batch out to
every shard through Serve's handles and merges their top-k. Serve restarts a replica that
dies; until it is back, a query that needs it fails with 503 and Retry-After (`SHARD_TIMEOUT_S`
bounds the wait), never with the other shards' answer presented as complete.
docs/search.md "Sharded index on Ray Serve".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from setdiv.index.sharded import IndexShard, ShardedSearcher, shard_dirs

__all__ = ["APP_PREFIX", "SHARD_TIMEOUT_S", "deploy_shards", "sharded_searcher"]

log = logging.getLogger(__name__)
APP_PREFIX = "setdiv-shard-"
SHARD_TIMEOUT_S = 10.0
"""How long the router waits for a shard's answer before the query fails with 503."""


class _Replica:
    """The body of a shard deployment (wrapped by `serve.deployment` in `deploy_shards`)."""

    def __init__(self, path: str, export: str | None) -> None:
        self.shard = IndexShard(path, export)

    def search(self, queries_QLD: np.ndarray, k: int, candidates: int | str) -> dict[str, Any]:
        return self.shard.search(queries_QLD, k, candidates)

    def items(self) -> list[dict[str, Any]]:
        return self.shard.items()


def deploy_shards(
    index: str | Path, export: str | None = None, cpus: float = 1.0,
    health_check_period_s: float = 2.0,
) -> list[Any]:  # fmt: skip
    """Deploy every shard of `index` as its own Serve application (one replica, `cpus` CPUs)
    on the Ray cluster this process is connected to; returns their handles, in shard order."""
    from ray import serve

    serve.start(http_options={"location": "NoServer"})  # (the router serves HTTP itself)
    deployment = serve.deployment(
        _Replica, num_replicas=1, ray_actor_options={"num_cpus": cpus},
        health_check_period_s=health_check_period_s, health_check_timeout_s=10,
    )  # fmt: skip
    handles = []
    for n, path in enumerate(shard_dirs(index)):
        name = f"{APP_PREFIX}{n:03d}"
        app = deployment.options(name=name).bind(str(path.resolve()), export)
        handles.append(serve.run(app, name=name, route_prefix=None))
        log.info("index shard %s deployed as %s", path, name)
    return handles


def _search_through(handle: Any) -> Any:
    def search(queries: np.ndarray, k: int, candidates: int | str) -> dict[str, Any]:
        return handle.search.remote(queries, k, candidates).result(timeout_s=SHARD_TIMEOUT_S)

    return search


def sharded_searcher(
    index: str | Path, export: str | None = None, address: str | None = None, cpus: float = 1.0
) -> ShardedSearcher:
    """Connect to Ray (`address`, default: the one `ray start` left, or a local one), deploy the
    shards and return the router's searcher over them."""
    import ray

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    start = time.perf_counter()
    handles = deploy_shards(index, export, cpus)
    items = [h.items.remote().result(timeout_s=600) for h in handles]
    nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    log.info(
        "%d index shards (%d items) on Ray Serve, %d node(s), ready in %.1f s", len(handles),
        sum(map(len, items)), nodes, time.perf_counter() - start,
    )  # fmt: skip
    return ShardedSearcher(index, [_search_through(h) for h in handles], items, export)
