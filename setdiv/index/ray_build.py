"""`setdiv index build --ray`: a gallery encoded by Ray Data actors across a Ray cluster's nodes.

The gallery's samples are cut into `slices` contiguous ranges, exactly as `--nproc N` cuts them
between local ranks (`EvalReader`'s rank slices, aligned to `data.eval_batch_size`, so every
batch, and with it every encoded vector, is the one a single process makes). A Ray Dataset of
slice numbers goes through `map_batches` with a pool of encoder actors (`--actors-per-node`
on every node, `--cpus-per-actor` / `--gpus-per-actor` each): an actor loads the export once
and encodes the slices it is given. The driver collects the slices in order and appends them
to the index as a local build does, so the index equals the local build's (elements bitwise
in float32). docs/search.md gives the commands.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import socket
from typing import Any

import numpy as np
import torch

__all__ = ["add_ray_arguments", "encode_gallery_ray"]

log = logging.getLogger(__name__)


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    from setdiv.errors import positive_int

    g = p.add_argument_group("encoding on a Ray cluster (--ray)")
    g.add_argument("--ray", action="store_true", help="encode with Ray Data actors")
    g.add_argument("--address", default=None, help="--ray: join this cluster (default: local)")
    g.add_argument("--actors-per-node", type=positive_int, default=1, help="--ray: encoders")
    g.add_argument("--cpus-per-actor", type=positive_int, default=1, help="--ray: threads each")
    g.add_argument("--gpus-per-actor", type=float, default=0.0, help="--ray: 0 = CPU actors")
    g.add_argument(
        "--slices-per-actor", type=positive_int, default=2, help="--ray: work units per actor"
    )


class _Encoder:
    """A Ray Data actor: the export loaded once, slices of the gallery encoded on demand."""

    def __init__(self, args: argparse.Namespace, slices: int) -> None:
        from setdiv.api import SetModel
        from setdiv.distributed import pick_device
        from setdiv.export import load_exported

        torch.set_num_threads(args.cpus_per_actor)
        self.exported = load_exported(args.export)
        if args.batch_size:  # (the local build's override, so the batches are the same)
            self.exported.cfg.data.eval_batch_size = args.batch_size
        self.model = SetModel(self.exported, pick_device())
        self.data, self.modality, self.slices = args.data, args.modality, slices

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from setdiv.data.loaders import build_eval_reader
        from setdiv.model.encoders import image_input_kind

        cfg = self.exported.cfg
        kind = image_input_kind(cfg.model.image.name)
        out: dict[str, list[Any]] = {"slice": [], "sets": [], "meta": [], "node": []}
        for i in batch["slice"].tolist():
            reader = build_eval_reader(
                cfg.data, self.data, kind, self.exported.tokenizer, rank=i, world=self.slices
            )
            enc = self.model.encode_batches(reader, modality=self.modality)
            sets = enc.images if self.modality == "image" else enc.captions
            buf = io.BytesIO()
            np.save(buf, sets.cpu().numpy(), allow_pickle=False)  # (bytes: no dtype change)
            meta = {
                "image_ids": enc.image_ids,
                "caption_ids": enc.caption_ids,
                "texts": enc.captions_text,
                "counts": enc.caption_counts,
            }
            out["slice"].append(i)
            out["sets"].append(buf.getvalue())
            out["meta"].append(json.dumps(meta))
            out["node"].append(socket.gethostname() + ":" + _node_id())
        return out


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()[:8]


def encode_gallery_ray(args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, list], int]:
    """(n, K, D) sets of the gallery, its ids / captions / counts (as `encode_gallery` takes
    them), and how many nodes encoded, from a Ray Data actor pool over the gallery's slices."""
    import ray

    from setdiv.distributed.ray_session import ray_session

    with ray_session(args.address, None, None):
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        actors = args.actors_per_node * len(nodes)
        slices = actors * args.slices_per_actor
        log.info("encoding %s on %d Ray actors (%d nodes), %d slices", args.data, actors,
                 len(nodes), slices)  # fmt: skip
        # The whole pool up before any slice is handed out (a clear error, not a hang, where
        # the cluster lacks the resources), one slice per actor at a time: slices spread.
        ray.data.DataContext.get_current().wait_for_min_actors_s = 600
        items = [{"slice": i} for i in range(slices)]
        rows = (
            ray.data.from_items(items, override_num_blocks=slices)
            .map_batches(
                _Encoder,
                fn_constructor_args=(args, slices),
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                num_cpus=args.cpus_per_actor,
                num_gpus=args.gpus_per_actor,
                scheduling_strategy="SPREAD",  # (best effort: one actor pool over the nodes)
            )
            .take_all()
        )
    rows.sort(key=lambda r: r["slice"])
    parts = [np.load(io.BytesIO(r["sets"]), allow_pickle=False) for r in rows]
    metas = [json.loads(r["meta"]) for r in rows]
    merged: dict[str, list] = {k: [] for k in ("image_ids", "caption_ids", "texts", "counts")}
    for m in metas:
        for k in merged:
            merged[k] += m[k]
    used = len({r["node"] for r in rows})
    sets = torch.from_numpy(np.concatenate([p for p in parts if len(p)], axis=0))
    return sets, merged, used
