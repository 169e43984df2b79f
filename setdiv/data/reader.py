"""Shard readers composed of webdataset's pipeline stages: training batches (split by rank and
data worker, seeded shuffling, equal batch counts on every rank) and evaluation batches (every
image once, in index order).

Shape legend: B images per rank batch, R regions, C region width, T tokens, 5B captions.

Training pipeline of data worker w of W on rank r (`TrainReader._pass`):
    shard list -> (seed, epoch) shuffle -> slice r::world -> slice w::W -> tar samples
    -> sample shuffle -> resume skip -> decode -> batches of B
The shard index gives every shard's sample count, so all ranks compute the same
`batches_per_epoch` (the smallest share any rank can get) without talking to each other; a
worker whose share runs short (uneven shards, corrupt samples) reads its shards again with
another shuffle. Worker w yields batches w, w + W, ... of the epoch, which the DataLoader's round
robin returns in order. A resumed epoch starting at batch s lets worker i play worker
(s + i) % W and drop, before decoding, the samples of the batches that worker already gave;
randomness (dropout, crops) is seeded per sample key, so skipping changes nothing else.

Corrupt samples and truncated tars are skipped, counted (`Batch.skipped`; the index tells how
many samples a truncated tar lost) and warned about at most every 10 s.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from setdiv.config import DataConfig
from setdiv.data.shards import ShardSet, decode_meta, read_shard
from setdiv.data.text import Tokenizer, word_dropout
from setdiv.distributed import die_with_parent
from setdiv.errors import UserError

__all__ = [
    "Batch",
    "EvalReader",
    "SampleOptions",
    "ShardSet",
    "TrainReader",
    "build_eval_reader",
    "build_train_reader",
    "collate",
    "image_file_pixels",
    "image_transform_steps",
    "per_rank_batch_size",
    "plan_epoch",
]

log = logging.getLogger(__name__)
CHUNK = 16
MAX_PASSES = 100
"""Reads of its shards a rank may need to fill one epoch from partly corrupt data."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Warner:
    """Rate-limited warnings: one line every `every` seconds at most, with the running count."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.last, self.count = every, -1e9, 0

    def __call__(self, msg: str, bad: int = 1) -> bool:
        self.count += bad
        if time.monotonic() - self.last >= self.every:
            log.warning("%s (%d bad samples so far in this reader process)", msg, self.count)
            self.last = time.monotonic()
        return True  # as a webdataset handler: skip and go on


_WARN = _Warner()


def _shard_samples(path: str) -> Iterator[dict]:
    return read_shard(path, lambda exc: _WARN(f"{path}: unreadable tar: {exc}", bad=0))


def _read_shards(src: Iterator[dict], expected: dict[str, int]) -> Iterator[dict]:
    """Pipeline stage: each shard's raw samples, then {"__lost__": k} for the k samples its
    index lists that it did not deliver (a truncated or unreadable tar)."""
    for item in src:
        url, seen = item["url"], 0
        for raw in _shard_samples(url):
            seen += 1
            yield raw
        if (lost := expected[url] - seen) > 0:
            _WARN(f"{url}: {lost} of {expected[url]} samples unreadable", lost)
            yield {"__lost__": lost}


# --- samples ----------------------------------------------------------------------------------


@dataclass
class SampleOptions:
    kind: str
    tokenizer: Tokenizer
    train: bool
    image_size: int = 224
    image_transform: str = "crop"
    hflip: bool = True
    region_dropout: float = 0.0
    word_dropout: float = 0.0


def image_transform_steps(
    size: int, train: bool, style: str = "crop", hflip: bool = True
) -> list[Callable]:
    """The torchvision v2 steps of the official DivE image pipeline (before normalisation).

    crop:   train RandomResizedCrop(size) (default scale 0.08-1), test Resize(size / 0.875) +
            CenterCrop(size) (224 -> 256 -> 224).
    gpo512: train RandomResizedCrop(size, scale=(0.36, 1)), test Resize((size, size)) (the
            official `gpo_aug` 512-pixel setting).
    Training adds a horizontal flip when `hflip` (official, though captions say left/right).
    """
    from torchvision.transforms import v2

    if train:
        scale = (0.36, 1.0) if style == "gpo512" else (0.08, 1.0)
        steps = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
        return steps + ([v2.RandomHorizontalFlip()] if hflip else [])
    if style == "gpo512":
        return [v2.Resize((size, size), antialias=True)]
    return [v2.Resize(int(size / 0.875), antialias=True), v2.CenterCrop(size)]


def _image_transform(opts: SampleOptions, train: bool) -> Callable[[Image.Image], np.ndarray]:
    """PIL image -> (3,size,size) uint8; normalisation happens batched in `collate`."""
    from torchvision.transforms import v2

    steps = image_transform_steps(opts.image_size, train, opts.image_transform, opts.hflip)
    pipeline = v2.Compose([v2.ToImage(), *steps])
    return lambda im: pipeline(im).numpy()


def image_file_pixels(path: str | Path | BinaryIO, size: int, style: str = "crop") -> Tensor:
    """(1,3,size,size) normalised pixels of an image file (or file object), as evaluation
    reads a test image. Raises UserError for anything Pillow cannot (or will not) decode."""
    opts = SampleOptions("image", None, False, size, style)  # type: ignore[arg-type]
    try:
        with Image.open(path) as im:
            pixels = _image_transform(opts, False)(im.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as exc:
        name = path if isinstance(path, (str, Path)) else "image"
        raise UserError(f"{name}: not a readable image ({exc})") from None
    return _normalise(torch.from_numpy(pixels)[None])


def _normalise(pixels_B3HW: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (pixels_B3HW.float() - mean) / std


def _decode(raw: dict, opts: SampleOptions, transform: Callable | None, seed: list[int]) -> dict:
    """A raw sample -> {"image", "tokens", ...}; raises on anything corrupt. The sample's own
    seed drives its region / word dropout and (in a forked torch RNG) its random crop."""
    meta, rng = decode_meta(raw), np.random.default_rng(seed)
    if opts.kind == "regions":  # stays numpy until collation: cheaper between processes
        regions_RC = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
        if regions_RC.ndim != 2 or not np.isfinite(regions_RC).all():
            raise ValueError(f"region array of shape {regions_RC.shape} (or non-finite values)")
        image = _drop_regions(regions_RC, opts.region_dropout, rng)
    else:
        with Image.open(io.BytesIO(raw["jpg"])) as im, torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            image = transform(im.convert("RGB"))  # type: ignore[misc]
    ids = [opts.tokenizer.encode(c) for c in meta["captions"]]
    if opts.word_dropout > 0:
        ids = [word_dropout(t, opts.tokenizer, opts.word_dropout, rng) for t in ids]
    keys = ("image_id", "caption_ids", "captions")
    return {"image": image, "tokens": ids, **{k: meta[k] for k in keys}}


def _drop_regions(regions_RC: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each region independently with probability p, keeping at least one."""
    if p <= 0:
        return regions_RC
    keep = rng.random(regions_RC.shape[0]) >= p
    if not keep.any():
        keep[rng.integers(regions_RC.shape[0])] = True
    return regions_RC[keep]


def _try_decode(raw: dict, opts: SampleOptions, transform: Callable | None, seed: list[int]):
    try:
        return _decode(raw, opts, transform, seed)
    except Exception as exc:  # noqa: BLE001 -- any decode failure skips just this sample
        key = raw.get("__key__")
        _WARN(f"{raw.get('__url__')}: skipping corrupt sample {key!r}: {type(exc).__name__}: {exc}")
        return None


# --- batches ----------------------------------------------------------------------------------


@dataclass
class Batch:
    images: Tensor
    """(B,R,C) padded region features, or (B,3,H,W) pixels."""
    image_mask: Tensor | None
    """(B,R) bool validity of regions; None for pixels."""
    tokens: Tensor
    """(5B,T) token ids, image-major: caption c belongs to image c // 5."""
    token_mask: Tensor
    """(5B,T) bool validity of tokens."""
    image_ids: list[str]
    caption_ids: list[Any]
    skipped: int = 0
    """Corrupt samples skipped while this batch was read."""
    captions: list[str] = field(default_factory=list)
    """The 5B caption texts, image-major."""


def collate(samples: list[dict[str, Any]], pad_id: int, skipped: int = 0) -> Batch:
    """Stack B decoded samples into a `Batch` (regions and tokens right-padded); `skipped`
    adds to the samples' own "skipped" counts."""
    images = [s["image"] for s in samples]
    if images[0].ndim == 2:  # regions (R, C), R varies under region dropout
        batch_images = torch.zeros(len(images), max(x.shape[0] for x in images), images[0].shape[1])
        image_mask = torch.zeros(batch_images.shape[:2], dtype=torch.bool)
        for i, x in enumerate(images):
            batch_images[i, : x.shape[0]] = torch.from_numpy(x)
            image_mask[i, : x.shape[0]] = True
    else:  # uint8 pixels (3, H, W)
        batch_images, image_mask = _normalise(torch.from_numpy(np.stack(images))), None
    captions = [t for s in samples for t in s["tokens"]]
    tokens = torch.full((len(captions), max(map(len, captions))), pad_id, dtype=torch.long)
    token_mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, t in enumerate(captions):
        tokens[i, : len(t)] = torch.tensor(t)
        token_mask[i, : len(t)] = True
    return Batch(
        batch_images,
        image_mask,
        tokens,
        token_mask,
        image_ids=[s["image_id"] for s in samples],
        caption_ids=[c for s in samples for c in s["caption_ids"]],
        skipped=skipped + sum(s.get("skipped", 0) for s in samples),
        captions=[c for s in samples for c in s["captions"]],
    )


# --- training ---------------------------------------------------------------------------------


def plan_epoch(
    shards: ShardSet, seed: int, epoch: int, world: int, shuffle: bool = True, attempt: int = 0
) -> list[list[int]]:
    """Shard indices per rank: a (seed, epoch, attempt)-seeded shuffle, then each rank's slice."""
    order = iter(range(n := len(shards.paths)))
    if shuffle:
        order = wds.shuffle(n, n, rng=random.Random(f"shards/{seed}/{epoch}/{attempt}"))(order)
    order = list(order)
    return [list(wds.slice(r, None, world)(order)) for r in range(world)]


_JOB_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}


def _worker_signals(_worker_id: int, rank_pid: int | None = None) -> None:
    """Data workers are forked from their rank and would inherit its signal handlers (a
    launcher's requeue handler on USR1/USR2, a SIGTERM that is only logged): a requeue signal
    sent to the whole job step is the rank's business, and SIGTERM must end a worker. The
    rank forks with these signals blocked (`_start_workers`); one that arrived in between is
    discarded here. A worker never outlives its rank (an orphan would block for ever on its
    full result pipe): if the rank died before the kernel was asked to tell us (`rank_pid`
    is no longer the parent), the worker ends now."""
    die_with_parent(signal.SIGKILL)
    if rank_pid is not None and os.getppid() != rank_pid:
        os._exit(1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _JOB_SIGNALS)


def _start_workers(loader: DataLoader) -> Iterator[Any]:
    """`iter(loader)` with the job signals blocked while the workers are forked, so none runs
    an inherited handler before `_worker_signals`; the rank gets any held back right after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _JOB_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _resume_skips(totals: list[int], consumed: int) -> tuple[int, list[int]]:
    """Where a pass stands after `consumed` samples: (the worker whose chunk comes next, the
    samples each worker has given), replaying the DataLoader's round robin over the workers'
    chunks (a worker drops out once it has given all of its `totals`)."""
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
    """One pass of a rank: data worker i reads the shards of worker (first + i) % W, drops the
    first `skip[w]` samples undecoded, and yields (sample or None, lost) items in chunks that
    end at multiples of `CHUNK` samples (one inter-process message per chunk)."""

    def __init__(self, reader: TrainReader, key: list[int], shards: list[list[str]]) -> None:
        self.reader, self.key, self.shards = reader, key, shards
        self.first, self.skip = 0, [0] * len(shards)

    def __iter__(self) -> Iterator[list[tuple[dict | None, int]]]:
        info = get_worker_info()
        w = (self.first + (info.id if info else 0)) % len(self.shards)
        opts, key, pos, chunk = self.reader.opts, [*self.key, w], self.skip[w], []
        stages = [wds.SimpleShardList(self.shards[w])]
        stages.append(functools.partial(_read_shards, expected=self.reader.expected))
        if self.reader.buffer > 1:
            rng = random.Random("samples/" + "/".join(map(str, key)))
            stages.append(wds.shuffle(self.reader.buffer, self.reader.buffer, rng=rng))
        transform = _image_transform(opts, True) if opts.kind == "image" else None
        for raw in islice(wds.DataPipeline(*stages), self.skip[w], None):
            if "__lost__" in raw:
                chunk.append((None, raw["__lost__"]))
                continue
            # Seeded by the sample, not by who reads it: the same augmentation on any number of
            # ranks and workers, and whatever a resume skipped.
            seed = [*self.key[:2], self.key[3], zlib.crc32(raw["__key__"].encode())]
            sample = _try_decode(raw, opts, transform, seed)
            chunk.append((sample, sample is None))
            pos += 1
            if pos % CHUNK == 0:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class TrainReader:
    """Per-rank training batches of `batch_size` images (+ their 5 captions each)."""

    def __init__(
        self,
        pattern: str,
        opts: SampleOptions,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        verify: bool = True,
    ) -> None:
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
        self.resampled = resampled
        self.expected = {
            str(p): i.samples for p, i in zip(self.shards.paths, self.shards.infos, strict=True)
        }
        counts = sorted(s.samples for s in self.shards.infos)  # a rank's smallest possible share
        per_rank = self.shards.num_samples // world if resampled else sum(counts[: n // world])
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise UserError(
                f"{pattern}: too few samples for one batch of {batch_size} on each of {world} ranks"
            )

    def _worker_shards(self, epoch: int, worker: int, attempt: int) -> list[str]:
        urls, W = [str(p) for p in self.shards.paths], self.workers
        if self.resampled:
            key = zlib.crc32(f"{self.seed}/{epoch}/{self.rank}/{worker}/{attempt}".encode())
            draw = wds.ResampledShards(
                urls, max(len(urls) // (self.world * W), 1), key, lambda: 0, deterministic=True
            )
            return [d["url"] for d in draw]
        mine = plan_epoch(self.shards, self.seed, epoch, self.world, attempt=attempt)[self.rank]
        return [urls[i] for i in wds.slice(worker, None, W)(mine)]

    def _samples(self, epoch: int, consumed: int) -> Iterator[tuple[dict | None, int]]:
        """The rank's (sample or None, lost) items of `epoch` after its first `consumed`
        samples; when corrupt data leaves the epoch short, its shards are read again with a
        fresh shuffle. A whole pass without one good sample stops it: reading the same bad
        shards again would not help."""
        for attempt in range(MAX_PASSES):
            shards = [self._worker_shards(epoch, w, attempt) for w in range(self.workers)]
            stream = _PassStream(self, [self.seed, epoch, self.rank, attempt], shards)
            totals = [sum(self.expected[u] for u in urls) for urls in shards]
            if consumed >= sum(totals):
                consumed -= sum(totals)  # (only when resuming an epoch made of several passes)
                continue
            stream.first, stream.skip = _resume_skips(totals, consumed)
            consumed, good, bad = 0, 0, 0
            # Closed explicitly when this generator is, so that its workers shut down here and
            # not in the garbage collector (which would swallow a requeue's SystemExit).
            with contextlib.closing(self._pass(stream, epoch, attempt)) as items:
                for sample, lost in items:
                    good, bad = good + (sample is not None), bad + lost
                    yield sample, lost
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

    def _pass(
        self, stream: _PassStream, epoch: int, attempt: int
    ) -> Iterator[tuple[dict | None, int]]:
        """One read of the rank's shards through the DataLoader's workers."""
        seed = np.random.default_rng([self.seed, epoch, self.rank, attempt]).integers(2**62)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,  # keep numpy arrays numpy: no per-sample tensor conversion
            # Its own generator: creating workers must not draw from the global RNG, or a
            # resumed run's model dropout would drift from the uninterrupted run's.
            generator=torch.Generator().manual_seed(int(seed)),
            prefetch_factor=4 if self.num_workers else None,
            worker_init_fn=functools.partial(_worker_signals, rank_pid=os.getpid()),
        )
        workers = _start_workers(loader)
        try:
            for chunk in workers:
                yield from chunk
        finally:
            # Shut the workers down here (an epoch usually ends before the stream does),
            # not in the iterator's __del__, where an exception raised meanwhile -- a
            # requeue signal handler's SystemExit -- would be swallowed.
            shutdown = getattr(workers, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Exactly `batches_per_epoch - start_batch` batches of epoch `epoch` (deterministic);
        the samples of the first `start_batch` batches are skipped without being decoded."""
        produced, pending, lost = start_batch, [], 0
        with contextlib.closing(self._samples(epoch, start_batch * self.batch_size)) as items:
            for sample, bad in items:
                lost += bad
                if sample is None:
                    continue
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield collate(pending, self.opts.tokenizer.pad_id, lost)
                    produced, pending, lost = produced + 1, [], 0
                if produced >= self.batches_per_epoch:
                    return


def _as_is(item: Any) -> Any:
    return item


class EvalReader:
    """Every image of the shards exactly once, in index order; rank r of `world` gets the r-th
    contiguous slice (so concatenating ranks' outputs restores index order), a multiple of
    `align` images long except for the last."""

    def __init__(
        self,
        pattern: str,
        opts: SampleOptions,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        align: int = 1,
    ) -> None:
        self.shards = ShardSet.resolve(pattern, opts.kind)
        self.opts, self.batch_size = opts, batch_size
        # Slices are multiples of `align` (the last takes the rest), so batch boundaries, and
        # hence every encoded vector, are the same whatever the number of ranks.
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
        expected = {str(self.shards.paths[i]): self.shards.infos[i].samples for i in mine}
        transform = _image_transform(self.opts, False) if self.opts.kind == "image" else None
        pos, pending, skipped, self.skipped = int(starts[mine[0]]) if mine else 0, [], 0, 0
        shards = wds.SimpleShardList(list(expected))
        with contextlib.closing(_read_shards(iter(shards), expected)) as stream:
            for raw in stream:
                if pos >= self.stop:
                    break
                width, sample = raw.get("__lost__", 1), None
                if "__lost__" not in raw and pos >= self.start:
                    sample = _try_decode(raw, self.opts, transform, [0])
                if sample is not None:
                    pending.append(sample)
                else:  # what was lost inside the slice
                    lost = max(0, min(pos + width, self.stop) - max(pos, self.start))
                    skipped, self.skipped = skipped + lost, self.skipped + lost
                pos += width
                if len(pending) == self.batch_size or (pending and pos >= self.stop):
                    yield collate(pending, self.opts.tokenizer.pad_id, skipped)
                    pending, skipped = [], 0
        if pending:
            yield collate(pending, self.opts.tokenizer.pad_id, skipped)


def per_rank_batch_size(cfg: DataConfig, world: int) -> int:
    """`data.batch_size` (the global batch) split over `world` ranks."""
    if cfg.batch_size % world:
        raise UserError(f"'data.batch_size'={cfg.batch_size} does not split over {world} ranks")
    return cfg.batch_size // world


def build_train_reader(
    cfg: DataConfig,
    kind: str,
    tokenizer: Tokenizer,
    rank: int,
    world: int,
    seed: int,
    batch_size: int | None = None,
) -> TrainReader:
    """The training reader of `data.train_shards`, `batch_size` images per rank (default:
    `per_rank_batch_size`)."""
    if cfg.train_shards is None:
        raise UserError("config key 'data.train_shards' is not set")
    opts = SampleOptions(
        kind, tokenizer, True, cfg.image_size, cfg.image_transform, cfg.hflip,
        cfg.region_dropout, cfg.word_dropout,
    )  # fmt: skip
    batch_size = per_rank_batch_size(cfg, world) if batch_size is None else batch_size
    return TrainReader(
        cfg.train_shards, opts, batch_size, rank, world, cfg.num_workers, seed,
        cfg.shuffle_buffer, cfg.resampled, cfg.verify_checksums,
    )  # fmt: skip


def build_eval_reader(
    cfg: DataConfig, pattern: str, kind: str, tokenizer: Tokenizer, rank: int = 0, world: int = 1
) -> EvalReader:
    """An evaluation reader over `pattern` (no augmentation, index order, rank's slice)."""
    opts = SampleOptions(kind, tokenizer, False, cfg.image_size, cfg.image_transform)
    return EvalReader(pattern, opts, cfg.eval_batch_size, rank, world, align=cfg.eval_batch_size)
