"""Shard readers on webdataset's stages. Training, on rank r of `world`, data worker w of W:
    shards -> (seed, epoch) shuffle -> slice r::world -> slice w::W -> tar samples
    -> sample shuffle -> resume skip -> decode -> chunks -> (rank) batches of B
Every rank reads the same `batches_per_epoch` (from the shard index), reading its shards again
if corrupt data leaves it short. Evaluation reads every image once, in index order. Corrupt
samples and unreadable tar tails are skipped, counted (`Batch.skipped`) and warned about.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import zlib
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from setdiv.data import samples
from setdiv.data import workers as data_workers
from setdiv.data.images import image_transform
from setdiv.data.noise import CaptionNoise, plan_caption_noise
from setdiv.data.remote import RETRIES, Retry
from setdiv.data.samples import Batch, SampleOptions, collate, decode_sample
from setdiv.data.shards import ShardSet, read_shard
from setdiv.errors import UserError

__all__ = ["Batch", "EvalReader", "SampleOptions", "TrainReader", "plan_epoch"]

log = logging.getLogger(__name__)
CHUNK = 16
"""Samples per message from a data worker to its rank."""
MAX_PASSES = 100
"""Reads of its shards a rank may need to fill one epoch from partly corrupt data."""
_LOST = {"__lost__": True}


def _read_shards(src: Iterator[dict], expected: dict[str, int], retry: Retry) -> Iterator[dict]:
    """Stage: each shard's raw samples (with the shard item's "draw", if any, as "__draw__",
    and the remote reads retried since the last one as "__retries__"), then one `_LOST` for
    each sample its index lists that it did not deliver (a truncated or unreadable tar), so
    positions match the index."""
    counted = RETRIES.count
    for item in src:
        url, seen = item["url"], 0
        warn = functools.partial(_unreadable, url)
        for raw in read_shard(url, warn, retry):
            seen, raw["__draw__"] = seen + 1, item.get("draw", ())
            raw["__retries__"], counted = RETRIES.count - counted, RETRIES.count
            yield raw
        if (lost := expected[url] - seen) > 0:
            samples.WARN(f"{url}: {lost} of {expected[url]} samples unreadable", lost)
            yield from [_LOST] * lost


def _unreadable(url: str, exc: Exception) -> bool:
    return samples.WARN(f"{url}: unreadable tar: {exc}", 0)


def plan_epoch(
    shards: ShardSet, seed: int, epoch: int, world: int, attempt: int = 0
) -> list[list[int]]:
    """Shard indices per rank: a (seed, epoch, attempt)-seeded shuffle, then each rank's slice."""
    rng = random.Random(f"shards/{seed}/{epoch}/{attempt}")
    order = list(wds.shuffle(n := len(shards.paths), n, rng=rng)(iter(range(n))))
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
    its first `skip[w]` samples undecoded, and sends its decoded samples (None for a bad one)
    in chunks that end at multiples of `CHUNK` of its samples."""

    def __init__(
        self, reader: TrainReader, key: list[int], shards: list[list[dict]], first: int,
        skip: list[int],
    ) -> None:  # fmt: skip
        self.reader, self.key, self.shards, self.first, self.skip = reader, key, shards, first, skip

    def __iter__(self) -> Iterator[list[dict | None]]:
        info, reader = get_worker_info(), self.reader
        w = (self.first + (info.id if info else 0)) % len(self.shards)
        stages = [functools.partial(iter, self.shards[w])]  # (a list would be taken as stages)
        stages.append(
            functools.partial(_read_shards, expected=reader.expected, retry=reader.opts.retry)
        )
        if reader.buffer > 1:
            rng = random.Random("samples/" + "/".join(map(str, [*self.key, w])))
            stages.append(wds.shuffle(reader.buffer, reader.buffer, rng=rng))
        transform = image_transform(reader.opts, True) if reader.opts.kind == "image" else None
        seed = [*self.key[:2], self.key[3]]  # (+ the sample's key: not the rank's nor worker's)
        decoded = (
            None
            if raw is _LOST
            else decode_sample(raw, reader.opts, transform, [*seed, *raw["__draw__"]])
            for raw in islice(wds.DataPipeline(*stages), self.skip[w], None)
        )
        size = -self.skip[w] % CHUNK or CHUNK
        while chunk := list(islice(decoded, size)):
            yield chunk
            size = CHUNK


class TrainReader:
    """Per-rank training batches of `batch_size` images (+ their captions). `pattern`: one
    shard pattern, or several (pattern, weight) sources, mixed by weight and drawn with
    replacement into epochs of `samples_per_epoch` (all ranks)."""

    def __init__(
        self, pattern: str | list[tuple[str, float]], opts: SampleOptions, batch_size: int,
        rank: int = 0, world: int = 1, num_workers: int = 2, seed: int = 0,
        shuffle_buffer: int = 1000, resampled: bool = False, verify: bool = True,
        samples_per_epoch: int | None = None,
    ) -> None:  # fmt: skip
        sources = [(pattern, 1.0)] if isinstance(pattern, str) else list(pattern)
        self.pattern = " + ".join(p for p, _ in sources)
        sets = [
            ShardSet.resolve(p, opts.kind, opts.format, opts.caption_key, opts.retry)
            for p, _ in sources
        ]
        for (p, _), s in zip(sources, sets, strict=True):
            if s.num_samples == 0:  # (a weighted draw would ask it for samples forever)
                where = "data.train_sources: source" if len(sources) > 1 else "training data"
                raise UserError(
                    f"{where} {p!r}: its {len(s.paths)} shard(s) hold 0 readable samples "
                    "(counted from the tar headers); remove it or rewrite its shards"
                )
        self.shards = sets[0]
        formats = {s.format for s in sets}
        if len(formats) > 1:  # (one decoder per reader: convert one source, or split readers)
            raise UserError(f"{self.pattern}: sources of different formats {sorted(formats)}")
        opts = dataclasses.replace(opts, format=formats.pop())
        self.weighted = len(sources) > 1 or samples_per_epoch is not None
        resampled = resampled or self.weighted
        self.workers = max(num_workers, 1)
        self.urls = [str(p) for s in sets for p in s.paths]
        n = len(self.urls)
        if not resampled and n < world * self.workers:
            raise UserError(
                f"{pattern}: {n} shards for {world} ranks x {num_workers} workers; write at least "
                f"{world * self.workers} shards (smaller --shard-size) or use fewer workers"
            )
        if verify:
            for s in sets:
                s.verify(list(range(rank, len(s.paths), world)))
        if opts.caption_noise > 0:
            opts = dataclasses.replace(opts, noise=self._noise_plan(opts, rank))
        self.opts, self.batch_size, self.rank, self.world = opts, batch_size, rank, world
        self.num_workers, self.seed, self.buffer = num_workers, seed, shuffle_buffer
        self.resampled = resampled
        self.expected = {
            str(p): i.samples for s in sets for p, i in zip(s.paths, s.infos, strict=True)
        }
        # Weighted draws: a source with probability w / (its mean shard size), so that the
        # *samples* drawn from the sources follow the weights.
        means = [max(s.num_samples / len(s.paths), 1e-9) for s in sets]
        share = [w / m for (_, w), m in zip(sources, means, strict=True)]
        self.source_p = [x / sum(share) for x in share]
        self.source_urls = [[str(p) for p in s.paths] for s in sets]
        self.samples_per_draw = sum(p * m for p, m in zip(self.source_p, means, strict=True))
        counts = sorted(self.expected.values())  # a rank's smallest possible share:
        if samples_per_epoch is not None:
            per_rank = samples_per_epoch // world
        else:
            per_rank = sum(counts) // world if resampled else sum(counts[: n // world])
        self.per_rank = per_rank
        self.batches_per_epoch = per_rank // batch_size
        self.position = 0
        """Positions (good and corrupt samples) of the epoch read up to the last batch handed
        out: the `start_position` that resumes right after it."""
        if self.batches_per_epoch < 1:
            raise UserError(
                f"{pattern}: too few samples for one batch of {batch_size} on each of {world} ranks"
            )

    def _noise_plan(self, opts: SampleOptions, rank: int) -> CaptionNoise:
        """The noisy-pair plan of `data.caption_noise` over all training shards (the same on
        every rank)."""
        plan = plan_caption_noise(
            self.urls, opts.format, opts.caption_noise, opts.caption_noise_seed, opts.caption_key
        )
        if rank == 0:
            log.info(
                "data.caption_noise=%g: %d of %d training captions replaced by other images' "
                "(seed %d)", opts.caption_noise, plan.replaced, plan.total, opts.caption_noise_seed,
            )  # fmt: skip
        return plan

    def _pass_shards(self, epoch: int, attempt: int) -> list[list[dict]]:
        """Each data worker's shards ({"url"}) for one pass. `resampled`: drawn with
        replacement, each with a "draw" (rank, worker, i) that also seeds its samples'
        augmentation, so a shard drawn twice is not augmented twice the same way; weighted
        sources: each draw picks a source by weight, then one of its shards."""
        if self.resampled:
            keys = [f"{self.seed}/{epoch}/{self.rank}/{w}/{attempt}" for w in range(self.workers)]
            if self.weighted:
                n = math.ceil(self.per_rank / self.workers / self.samples_per_draw) + 1
                return [self._weighted_draws(key, w, n) for w, key in enumerate(keys)]
            n = max(len(self.urls) // (self.world * self.workers), 1)
            draw = functools.partial(wds.ResampledShards, self.urls, n, worker_seed=lambda: 0)
            return [
                [{**d, "draw": (self.rank, w, i + 1)} for i, d in enumerate(
                    draw(zlib.crc32(key.encode()), deterministic=True))]
                for w, key in enumerate(keys)
            ]  # fmt: skip
        mine = plan_epoch(self.shards, self.seed, epoch, self.world, attempt=attempt)[self.rank]
        split = [wds.slice(w, None, self.workers)(mine) for w in range(self.workers)]
        return [[{"url": self.urls[i]} for i in shards] for shards in split]

    def _weighted_draws(self, key: str, worker: int, n: int) -> list[dict]:
        rng = random.Random(zlib.crc32(f"sources/{key}".encode()))
        picks = rng.choices(range(len(self.source_urls)), weights=self.source_p, k=n)
        return [
            {"url": rng.choice(self.source_urls[s]), "draw": (self.rank, worker, i + 1)}
            for i, s in enumerate(picks)
        ]

    def _samples(self, epoch: int, consumed: int) -> Iterator[dict]:
        """The rank's good samples of `epoch` after its first `consumed` positions (good and bad
        samples), each with the count of bad ones before it ("skipped") and its "position";
        when corrupt data leaves the epoch short, the shards are read again with a fresh
        shuffle. A whole pass without one good sample stops it: reading the same bad shards
        again would not help."""
        position = 0  # of the epoch, over all its passes
        for attempt in range(MAX_PASSES):
            shards = self._pass_shards(epoch, attempt)
            totals = [sum(self.expected[s["url"]] for s in mine) for mine in shards]
            position += min(consumed, sum(totals))
            if consumed >= sum(totals):  # (resuming an epoch that took several passes)
                consumed -= sum(totals)
                continue
            key = [self.seed, epoch, self.rank, attempt]
            stream = _PassStream(self, key, shards, *_resume_point(totals, consumed))
            consumed, good, bad = 0, 0, 0  # bad: since the last good sample
            with contextlib.closing(self._pass(stream)) as items:  # (see `_pass`)
                for sample in items:
                    position += 1
                    if sample is None:
                        bad += 1
                    else:
                        sample["skipped"], sample["position"] = bad, position
                        good, bad = good + 1, 0
                        yield sample
            if good == 0:
                names = [s["url"] for mine in shards for s in mine]
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

    def _pass(self, stream: _PassStream) -> Iterator[dict | None]:
        """One read of the rank's shards through the DataLoader's workers, which are shut down
        when this generator is closed: an epoch usually ends before its pass does, and a
        finaliser would swallow an exception raised meanwhile (a requeue's SystemExit)."""
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=list,  # numpy stays numpy: no per-sample tensor conversion
            # Its own generator: creating workers must not draw from the global RNG, or a
            # resumed run's model dropout would drift from the uninterrupted run's.
            generator=torch.Generator().manual_seed(zlib.crc32(str(stream.key).encode())),
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=functools.partial(data_workers.data_worker_init, rank_pid=os.getpid()),
        )
        workers = data_workers.start_data_workers(loader)
        try:
            for chunk in workers:
                yield from chunk
        finally:
            # Shut down and freed (their processes' finalisers run) with the job signals held
            # back: a requeue's SystemExit raised in a finaliser would be lost.
            with data_workers.deferred_job_signals():
                getattr(workers, "_shutdown_workers", lambda: None)()  # (none with 0 workers)
                del workers

    def epoch(
        self, epoch: int, start_batch: int = 0, start_position: int | None = None
    ) -> Iterator[Batch]:
        """Exactly `batches_per_epoch - start_batch` batches of epoch `epoch` (deterministic);
        the samples of the first `start_batch` batches are skipped without being decoded.
        With corrupt data, pass the `position` read after batch `start_batch - 1` as
        `start_position` to land exactly on batch `start_batch`."""
        self.position = start_batch * self.batch_size if start_position is None else start_position
        items = self._samples(epoch, self.position)

        def batch(samples: list[dict]) -> Batch:
            self.position = samples[-1]["position"]
            return collate(samples, self.opts.tokenizer.pad_id, opts=self.opts)

        # Cut the samples, not the batches: webdataset's batcher sends a batch once the next
        # sample arrives, which at the epoch's end would start another pass for nothing.
        wanted = islice(items, (self.batches_per_epoch - start_batch) * self.batch_size)
        with contextlib.closing(items):  # (see `_pass`)
            yield from wds.batched(self.batch_size, collation_fn=batch, partial=False)(wanted)


class EvalReader:
    """Every image of the shards exactly once, in index order; rank r of `world` gets the r-th
    contiguous slice (so concatenating ranks' outputs restores index order), a multiple of
    `align` images long except for the last, so batch boundaries (and every encoded vector)
    are the same whatever the number of ranks."""

    def __init__(
        self, pattern: str, opts: SampleOptions, batch_size: int, rank: int = 0, world: int = 1,
        align: int = 1,
    ) -> None:  # fmt: skip
        self.shards = ShardSet.resolve(
            pattern, opts.kind, opts.format, opts.caption_key, opts.retry
        )
        self.opts = dataclasses.replace(opts, format=self.shards.format)
        self.batch_size = batch_size
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
        self.skipped = 0
        if self.start >= self.stop:  # (a rank past the end of a small set)
            return
        ends = np.cumsum([info.samples for info in self.shards.infos])
        first = int(np.searchsorted(ends, self.start, side="right"))  # the shard of `start`
        offset = int(ends[first - 1]) if first else 0
        expected = {
            str(p): i.samples for p, i in zip(self.shards.paths, self.shards.infos, strict=True)
        }
        shards = iter(wds.SimpleShardList(list(expected)[first:]))
        stream = _read_shards(shards, expected, self.opts.retry)
        transform = image_transform(self.opts, False) if self.opts.kind == "image" else None
        pending, skipped, pad_id = [], 0, self.opts.tokenizer.pad_id
        with contextlib.closing(stream):  # (its tar files, whose tail the slice may not read)
            for raw in islice(stream, self.start - offset, self.stop - offset):
                sample = None if raw is _LOST else decode_sample(raw, self.opts, transform, [0])
                if sample is None:
                    skipped, self.skipped = skipped + 1, self.skipped + 1
                    continue
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield collate(pending, pad_id, skipped, self.opts)
                    pending, skipped = [], 0
        if pending:
            yield collate(pending, pad_id, skipped, self.opts)
