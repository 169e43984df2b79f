"""Shard readers built from webdataset's stages: training batches (split by rank and data
worker, seeded shuffles, the same number of batches on every rank) and evaluation batches
(every image once, in index order).

Training, on rank r of `world`, data worker w of W (`_PassStream`):
    shards -> (seed, epoch) shuffle -> slice r::world -> slice w::W -> tar samples
    -> sample shuffle -> resume skip -> decode -> chunks -> (rank) batches of B
The shard index gives every shard's sample count, so all ranks agree on `batches_per_epoch` (the
smallest share any rank can get) without talking; a rank whose share runs short of good samples
reads its shards again with another shuffle. A resumed epoch replays the workers' round robin
over chunks to find what each had given, and drops those samples before decoding them.
Corrupt samples and truncated tars are skipped, counted (`Batch.skipped`) and warned about.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import zlib
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from setdiv import distributed
from setdiv.config import DataConfig
from setdiv.data import samples
from setdiv.data.samples import Batch, SampleOptions, collate, decode_sample, image_transform
from setdiv.data.shards import ShardSet, read_shard
from setdiv.data.text import Tokenizer
from setdiv.errors import UserError

__all__ = [
    *("Batch", "EvalReader", "SampleOptions", "TrainReader", "build_eval_reader"),
    *("build_train_reader", "per_rank_batch_size", "plan_epoch"),
]

CHUNK = 16
"""Samples per message from a data worker to its rank."""
MAX_PASSES = 100
"""Reads of its shards a rank may need to fill one epoch from partly corrupt data."""


def _shard_samples(path: str) -> Iterator[dict]:
    return read_shard(path, lambda exc: samples.WARN(f"{path}: unreadable tar: {exc}", bad=0))


def _read_shards(src: Iterator[dict], expected: dict[str, int]) -> Iterator[dict]:
    """Stage: each shard's raw samples, then {"__lost__": k} for the k samples its index
    lists that it did not deliver (a truncated or unreadable tar)."""
    for item in src:
        url, seen = item["url"], 0
        for raw in _shard_samples(url):
            seen += 1
            yield raw
        if (lost := expected[url] - seen) > 0:
            samples.WARN(f"{url}: {lost} of {expected[url]} samples unreadable", lost)
            yield {"__lost__": lost}


def plan_epoch(
    shards: ShardSet, seed: int, epoch: int, world: int, shuffle: bool = True, attempt: int = 0
) -> list[list[int]]:
    """Shard indices per rank: a (seed, epoch, attempt)-seeded shuffle, then each rank's slice."""
    order = iter(range(n := len(shards.paths)))
    if shuffle:
        order = wds.shuffle(n, n, rng=random.Random(f"shards/{seed}/{epoch}/{attempt}"))(order)
    order = list(order)
    return [list(wds.slice(r, None, world)(order)) for r in range(world)]


def _resume_point(totals: list[int], consumed: int) -> tuple[int, list[int]]:
    """(the worker whose chunk is next, the samples each worker has given) after `consumed`
    samples of a pass, replaying the DataLoader's round robin over the workers' chunks (a
    worker drops out once it has given its `totals`)."""
    given = [0] * len(totals)
    while any(g < t for g, t in zip(given, totals, strict=True)):
        for w, total in enumerate(totals):
            if (take := min(CHUNK - given[w] % CHUNK, total - given[w])) <= 0:
                continue
            if consumed < take:
                given[w] += consumed
                return w, given
            consumed, given[w] = consumed - take, given[w] + take
    return 0, given


class _PassStream(IterableDataset):
    """One pass of a rank over its shards: data worker i plays worker (first + i) % W, drops
    its first `skip[w]` samples undecoded, and sends (sample or None, lost) items in chunks
    that end at multiples of `CHUNK` of its samples."""

    def __init__(self, reader: TrainReader, key: list[int], shards: list[list[str]]) -> None:
        self.reader, self.key, self.shards = reader, key, shards
        self.first, self.skip = 0, [0] * len(shards)

    def __iter__(self) -> Iterator[list[tuple[dict | None, int]]]:
        info, reader = get_worker_info(), self.reader
        w = (self.first + (info.id if info else 0)) % len(self.shards)
        stages = [wds.SimpleShardList(self.shards[w])]
        stages.append(functools.partial(_read_shards, expected=reader.expected))
        if reader.buffer > 1:
            rng = random.Random("samples/" + "/".join(map(str, [*self.key, w])))
            stages.append(wds.shuffle(reader.buffer, reader.buffer, rng=rng))
        transform = image_transform(reader.opts, True) if reader.opts.kind == "image" else None
        pos, chunk = self.skip[w], []
        for raw in islice(wds.DataPipeline(*stages), self.skip[w], None):
            if "__lost__" in raw:
                chunk.append((None, raw["__lost__"]))
                continue
            # Seeded by the sample, not by who reads it: the same augmentation whatever the
            # number of ranks and workers, and whatever a resume skipped.
            seed = [*self.key[:2], self.key[3], zlib.crc32(raw["__key__"].encode())]
            sample = decode_sample(raw, reader.opts, transform, seed)
            chunk.append((sample, int(sample is None)))
            if (pos := pos + 1) % CHUNK == 0:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class TrainReader:
    """Per-rank training batches of `batch_size` images (+ their 5 captions each)."""

    def __init__(
        self, pattern: str, opts: SampleOptions, batch_size: int, rank: int = 0, world: int = 1,
        num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000, resampled: bool = False,
        verify: bool = True,
    ) -> None:  # fmt: skip
        self.pattern, self.shards = pattern, ShardSet.resolve(pattern, opts.kind)
        n, self.workers = len(self.shards.paths), max(num_workers, 1)
        if not resampled and n < world * self.workers:
            raise UserError(
                f"{pattern}: {n} shards for {world} ranks x {num_workers} workers; write at least "
                f"{world * self.workers} shards (smaller --shard-size) or use fewer workers"
            )
        if verify:
            self.shards.verify(list(range(rank, n, world)))
        self.opts, self.batch_size, self.rank, self.world = opts, batch_size, rank, world
        self.num_workers, self.seed, self.buffer = num_workers, seed, shuffle_buffer
        self.resampled, self.urls = resampled, [str(p) for p in self.shards.paths]
        self.expected = {u: i.samples for u, i in zip(self.urls, self.shards.infos, strict=True)}
        counts = sorted(self.expected.values())  # a rank's smallest possible share:
        per_rank = sum(counts) // world if resampled else sum(counts[: n // world])
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise UserError(
                f"{pattern}: too few samples for one batch of {batch_size} on each of {world} ranks"
            )

    def _pass_shards(self, epoch: int, attempt: int) -> list[list[str]]:
        """Each data worker's shards for one pass (the rank's plan is shuffled once)."""
        if self.resampled:
            draws = max(len(self.urls) // (self.world * self.workers), 1)
            keys = [f"{self.seed}/{epoch}/{self.rank}/{w}/{attempt}" for w in range(self.workers)]
            return [
                [d["url"] for d in wds.ResampledShards(
                    self.urls, draws, zlib.crc32(k.encode()), lambda: 0, deterministic=True
                )]
                for k in keys
            ]  # fmt: skip
        mine = plan_epoch(self.shards, self.seed, epoch, self.world, attempt=attempt)[self.rank]
        return [[self.urls[i] for i in wds.slice(w, None, self.workers)(mine)]
                for w in range(self.workers)]  # fmt: skip

    def _samples(self, epoch: int, consumed: int) -> Iterator[dict]:
        """The rank's good samples of `epoch` after its first `consumed`, each with the count of
        bad ones before it ("skipped"); when corrupt data leaves the epoch short, the shards
        are read again with a fresh shuffle. A whole pass without one good sample stops it:
        reading the same bad shards again would not help."""
        for attempt in range(MAX_PASSES):
            shards = self._pass_shards(epoch, attempt)
            totals = [sum(self.expected[u] for u in urls) for urls in shards]
            if consumed >= sum(totals):  # (resuming an epoch that took several passes)
                consumed -= sum(totals)
                continue
            stream = _PassStream(self, [self.seed, epoch, self.rank, attempt], shards)
            stream.first, stream.skip = _resume_point(totals, consumed)
            consumed, good, bad, pending = 0, 0, 0, 0
            # Closed explicitly when this generator is, so that its workers shut down here and
            # not in the garbage collector (which would swallow a requeue's SystemExit).
            with contextlib.closing(self._pass(stream, attempt)) as items:
                for sample, lost in items:
                    bad, pending = bad + lost, pending + lost
                    if sample is not None:
                        good, sample["skipped"], pending = good + 1, pending, 0
                        yield sample
            if good == 0:
                names = [u for urls in shards for u in urls]
                raise UserError(
                    f"no readable training sample in a whole pass over rank {self.rank}'s "
                    f"{len(names)} shard(s) of {self.pattern!r} ({', '.join(names[:4])}"
                    f"{', ...' * (len(names) > 4)}): {bad} of {sum(totals)} samples are corrupt "
                    "or missing"
                )
        raise UserError(
            f"{self.pattern!r}: {MAX_PASSES} passes over the shards did not fill epoch {epoch}: "
            "most samples are corrupt (see the warnings above)"
        )

    def _pass(self, stream: _PassStream, attempt: int) -> Iterator[tuple[dict | None, int]]:
        """One read of the rank's shards through the DataLoader's workers."""
        seed = np.random.default_rng([*stream.key, attempt]).integers(2**62)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,  # keep numpy arrays numpy: no per-sample tensor conversion
            # Its own generator: creating workers must not draw from the global RNG, or a
            # resumed run's model dropout would drift from the uninterrupted run's.
            generator=torch.Generator().manual_seed(int(seed)),
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=functools.partial(distributed.data_worker_init, rank_pid=os.getpid()),
        )
        workers = distributed.start_data_workers(loader)
        try:
            for chunk in workers:
                yield from chunk
        finally:
            # Shut the workers down here (an epoch usually ends before the stream does), not
            # in the iterator's __del__, which would swallow an exception raised meanwhile (a
            # requeue signal handler's SystemExit).
            if (shutdown := getattr(workers, "_shutdown_workers", None)) is not None:
                shutdown()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Exactly `batches_per_epoch - start_batch` batches of epoch `epoch` (deterministic);
        the samples of the first `start_batch` batches are skipped without being decoded."""
        items = self._samples(epoch, start_batch * self.batch_size)
        batch = functools.partial(collate, pad_id=self.opts.tokenizer.pad_id)
        # Cut the samples, not the batches: webdataset's batcher sends a batch once the next
        # sample arrives, which at the epoch's end would start another pass for nothing.
        wanted = islice(items, (self.batches_per_epoch - start_batch) * self.batch_size)
        with contextlib.closing(items):  # (see `_samples`)
            yield from wds.batched(self.batch_size, collation_fn=batch, partial=False)(wanted)


def _as_is(item: Any) -> Any:
    return item


class EvalReader:
    """Every image of the shards exactly once, in index order; rank r of `world` gets the r-th
    contiguous slice (so concatenating ranks' outputs restores index order), a multiple of
    `align` images long except for the last, so batch boundaries (and every encoded vector)
    are the same whatever the number of ranks."""

    def __init__(
        self, pattern: str, opts: SampleOptions, batch_size: int, rank: int = 0, world: int = 1,
        align: int = 1,
    ) -> None:  # fmt: skip
        self.shards = ShardSet.resolve(pattern, opts.kind)
        self.opts, self.batch_size = opts, batch_size
        total = self.shards.num_samples
        per_rank = -(-total // (world * align)) * align
        self.start, self.stop = min(rank * per_rank, total), min((rank + 1) * per_rank, total)
        self.skipped = 0
        """Corrupt samples skipped in this rank's slice in the last full iteration."""

    def __len__(self) -> int:
        """Images in this rank's slice."""
        return self.stop - self.start

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        starts = np.cumsum([0] + [s.samples for s in self.shards.infos])
        mine = [i for i in range(len(starts) - 1) if starts[i + 1] > self.start]
        self.skipped = 0
        if not mine or self.start >= self.stop:
            return
        expected = {str(self.shards.paths[i]): self.shards.infos[i].samples for i in mine}
        transform = image_transform(self.opts, False) if self.opts.kind == "image" else None
        pos, pending, skipped = int(starts[mine[0]]), [], 0
        stream = _read_shards(iter(wds.SimpleShardList(list(expected))), expected)
        with contextlib.closing(stream):
            for raw in stream:
                if pos >= self.stop:
                    break
                width, sample = raw.get("__lost__", 1), None
                if "__lost__" not in raw and pos >= self.start:
                    sample = decode_sample(raw, self.opts, transform, [0])
                if sample is not None:
                    pending.append(sample)
                else:  # what was lost inside the slice
                    lost = max(0, min(pos + width, self.stop) - max(pos, self.start))
                    skipped, self.skipped = skipped + lost, self.skipped + lost
                pos += width
                if len(pending) == self.batch_size or (pending and pos >= self.stop):
                    yield collate(pending, self.opts.tokenizer.pad_id, skipped)
                    pending, skipped = [], 0


def per_rank_batch_size(cfg: DataConfig, world: int) -> int:
    """`data.batch_size` (the global batch) split over `world` ranks."""
    if cfg.batch_size % world:
        raise UserError(f"'data.batch_size'={cfg.batch_size} does not split over {world} ranks")
    return cfg.batch_size // world


def build_train_reader(
    cfg: DataConfig, kind: str, tokenizer: Tokenizer, rank: int, world: int, seed: int,
    batch_size: int | None = None,
) -> TrainReader:  # fmt: skip
    """The training reader of `data.train_shards`, `batch_size` images per rank (default:
    `per_rank_batch_size`)."""
    if cfg.train_shards is None:
        raise UserError("config key 'data.train_shards' is not set")
    opts = SampleOptions(
        kind, tokenizer, True, cfg.image_size, cfg.image_transform, cfg.hflip,
        cfg.region_dropout, cfg.word_dropout,
    )  # fmt: skip
    return TrainReader(
        cfg.train_shards, opts, batch_size or per_rank_batch_size(cfg, world), rank, world,
        cfg.num_workers, seed, cfg.shuffle_buffer, cfg.resampled, cfg.verify_checksums,
    )  # fmt: skip


def build_eval_reader(
    cfg: DataConfig, pattern: str, kind: str, tokenizer: Tokenizer, rank: int = 0, world: int = 1
) -> EvalReader:
    """An evaluation reader over `pattern` (no augmentation, index order, rank's slice)."""
    opts = SampleOptions(kind, tokenizer, False, cfg.image_size, cfg.image_transform)
    return EvalReader(pattern, opts, cfg.eval_batch_size, rank, world, align=cfg.eval_batch_size)
