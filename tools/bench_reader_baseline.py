"""The training reader before issue 12 (hand-written tar streaming, worker splitting and shuffle
buffer), kept only as the baseline of `tools/bench_reader.py`.

Its docstring was: streaming shard readers: a training reader (split by rank and worker,
seeded shuffling, equal batch counts on every rank) and an evaluation reader (every image
once, in index order).

Shape legend: B images per rank batch, R regions, C region width, T tokens, 5B captions.

Epoch plan. Shards are listed in `{split}-index.json` with their sample counts, so every rank
computes the same plan without talking to the others: the shard list is shuffled with
(seed, epoch), rank r takes every world-th shard, and worker w of that rank every
num_workers-th of those. Each rank then yields exactly `batches_per_epoch` batches, the minimum
over ranks, so no rank waits at a collective for a peer that ran out of data. If corrupt
samples leave a rank short, it re-reads its shards (another shuffle) to fill the epoch.

Decoding runs in DataLoader workers; batching (B images with all 5B captions, image-major)
runs in the main process so a batch can mix workers' samples. Corrupt samples and truncated
tars are skipped, counted (`Batch.skipped`) and warned about at most every 10 s.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import json
import logging
import os
import signal
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from setdiv.config import DataConfig
from setdiv.data.shards import CAPTIONS_PER_IMAGE, ShardIndex, ShardInfo, index_path, sha256_file
from setdiv.data.text import Tokenizer, word_dropout
from setdiv.distributed import die_with_parent

__all__ = [
    "Batch",
    "EvalReader",
    "SampleOptions",
    "ShardSet",
    "TrainReader",
    "build_eval_reader",
    "build_train_reader",
    "collate",
    "image_transform_steps",
]

log = logging.getLogger(__name__)
CHUNK = 16
MAX_PASSES = 100
"""Reads of its shards a rank may need to fill one epoch from partly corrupt data."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- shard lists ------------------------------------------------------------------------------


@dataclass
class ShardSet:
    """Resolved shard paths with their index entries, in index order."""

    paths: list[Path]
    infos: list[ShardInfo]
    kind: str

    @classmethod
    def resolve(cls, pattern: str, kind: str | None = None) -> ShardSet:
        """Expand braces and globs; every shard must exist and be listed in its index, and
        hold `kind` samples ("regions" / "image") when given."""
        paths: list[Path] = []
        for part in braceexpand(pattern):
            matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
            if not matches:
                raise FileNotFoundError(f"no shard matches {part!r}")
            paths += [Path(m) for m in matches]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"missing shard: {p}")
        indexes: dict[Path, ShardIndex] = {}
        infos, kinds = [], set()
        for p in paths:
            idx_file = index_path(p.parent, p.name.rsplit("-", 1)[0])
            if idx_file not in indexes:
                indexes[idx_file] = ShardIndex.load(idx_file)
            by_name = {s.name: s for s in indexes[idx_file].shards}
            if p.name not in by_name:
                raise ValueError(f"shard {p} is not listed in {idx_file}")
            infos.append(by_name[p.name])
            kinds.add(indexes[idx_file].kind)
        if len(kinds) != 1:
            raise ValueError(f"shards of different kinds in {pattern!r}: {sorted(kinds)}")
        if kind is not None and kind not in kinds:
            raise ValueError(f"{pattern}: shards hold {kinds.pop()!r}, the model reads {kind!r}")
        return cls(paths, infos, kinds.pop())

    def verify(self, which: list[int] | None = None) -> None:
        """Compare sha256 of the chosen shards (default all) with the index; raise on mismatch."""
        for i in range(len(self.paths)) if which is None else which:
            digest = sha256_file(self.paths[i])
            if digest != self.infos[i].sha256:
                raise ValueError(
                    f"checksum mismatch for shard {self.paths[i]}: index says "
                    f"{self.infos[i].sha256[:12]}..., file is {digest[:12]}..."
                )

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.infos)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def plan_epoch(
    shards: ShardSet, seed: int, epoch: int, world: int, shuffle: bool = True
) -> list[list[int]]:
    """Shard indices per rank for an epoch: a (seed, epoch)-seeded shuffle dealt round-robin."""
    order = list(range(len(shards.paths)))
    if shuffle:
        order = [int(i) for i in _rng(seed, epoch).permutation(order)]
    return [order[r::world] for r in range(world)]


# --- samples ----------------------------------------------------------------------------------


class _Warner:
    """Rate-limited warnings: one line every `every` seconds at most, with the running count."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.last, self.count = every, -1e9, 0

    def __call__(self, msg: str, bad: int = 1) -> None:
        self.count += bad
        now = time.monotonic()
        if now - self.last >= self.every:
            log.warning("%s (%d bad samples so far in this reader process)", msg, self.count)
            self.last = now


_WARN = _Warner()


def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample in file order; a truncated or unreadable tar ends early
    (the caller counts what is missing against the index)."""
    current, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key != current and current is not None:
                    yield current, files
                    files = {}
                current = key
                files[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, OSError) as exc:
        _WARN(f"{path}: unreadable after sample {current!r}: {exc}", bad=0)  # counted by caller
        return
    if current is not None:
        yield current, files


def _decode_meta(files: dict[str, bytes]) -> dict[str, Any]:
    meta = json.loads(files["json"])
    if len(meta["captions"]) != CAPTIONS_PER_IMAGE:
        raise ValueError(f"{len(meta['captions'])} captions")
    return meta


def _decode_regions(files: dict[str, bytes]) -> np.ndarray:
    # Stays numpy in its storage dtype until collation: cheaper to pass between processes.
    arr = np.load(io.BytesIO(files["npy"]), allow_pickle=False)
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ValueError(f"region array of shape {arr.shape} (or non-finite values)")
    return arr


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

    if style not in ("crop", "gpo512"):
        raise ValueError(f"data.image_transform must be crop or gpo512, got {style!r}")
    if train:
        scale = (0.36, 1.0) if style == "gpo512" else (0.08, 1.0)
        steps = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
        return steps + ([v2.RandomHorizontalFlip()] if hflip else [])
    if style == "gpo512":
        return [v2.Resize((size, size), antialias=True)]
    return [v2.Resize(int(size / 0.875), antialias=True), v2.CenterCrop(size)]


def _image_transform(
    size: int, train: bool, style: str = "crop", hflip: bool = True
) -> Callable[[Image.Image], np.ndarray]:
    """PIL image -> (3,size,size) uint8; normalisation happens batched in `collate`."""
    from torchvision.transforms import v2

    pipeline = v2.Compose([v2.ToImage(), *image_transform_steps(size, train, style, hflip)])
    return lambda im: pipeline(im).numpy()


def image_file_pixels(path: str | Path | BinaryIO, size: int, style: str = "crop") -> Tensor:
    """(1,3,size,size) normalised pixels of an image file (or file object), as evaluation
    reads a test image. Raises ValueError for anything Pillow cannot (or will not) decode."""
    name = path if isinstance(path, (str, Path)) else "image"
    try:
        with Image.open(path) as im:
            pixels = _image_transform(size, False, style, False)(im.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{name}: not a readable image ({exc})") from None
    return _normalise(torch.from_numpy(pixels)[None])


def _normalise(pixels_B3HW: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (pixels_B3HW.float() - mean) / std


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


class _SampleStream(IterableDataset):
    """Decoded samples of (shard, expected count) pairs; in a DataLoader each worker takes
    every num_workers-th shard. Yields (sample or None, samples skipped since the last yield)."""

    def __init__(
        self,
        shards: list[tuple[Path, int]],
        opts: SampleOptions,
        seed_key: tuple[int, ...],
        buffer: int,
    ) -> None:
        self.shards, self.opts, self.seed_key, self.buffer = shards, opts, seed_key, buffer

    def __iter__(self) -> Iterator[list[tuple[dict[str, Any] | None, int]]]:
        """Chunks of `CHUNK` items: one inter-process message per chunk, not per sample."""
        chunk = []
        for item in self._items():
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _items(self) -> Iterator[tuple[dict[str, Any] | None, int]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        rng = _rng(*self.seed_key, wid)
        transform = (
            _image_transform(
                self.opts.image_size, self.opts.train, self.opts.image_transform, self.opts.hflip
            )
            if self.opts.kind == "image"
            else None
        )
        skipped, pool = 0, []
        for path, expected in self.shards[wid::nworkers]:
            seen = 0
            for key, files in _tar_samples(path):
                seen += 1
                sample = self._decode(path, key, files, transform, rng)
                if sample is None:
                    skipped += 1
                    continue
                if self.buffer <= 1:
                    yield sample, skipped
                    skipped = 0
                    continue
                pool.append(sample)
                if len(pool) >= self.buffer:
                    yield pool.pop(int(rng.integers(len(pool)))), skipped
                    skipped = 0
            if seen < expected:  # truncated shard: the rest of its samples are lost
                _WARN(
                    f"{path}: {expected - seen} of {expected} samples unreadable", expected - seen
                )
                skipped += expected - seen
        for i in rng.permutation(len(pool)):
            yield pool[i], skipped
            skipped = 0
        if skipped:
            yield None, skipped

    def _decode(
        self,
        path: Path,
        key: str,
        files: dict[str, bytes],
        transform: Callable | None,
        rng: np.random.Generator,
    ) -> dict[str, Any] | None:
        opts = self.opts
        try:
            meta = _decode_meta(files)
            if opts.kind == "regions":
                image = _drop_regions(_decode_regions(files), opts.region_dropout, rng)
            else:
                with Image.open(io.BytesIO(files["jpg"])) as im:
                    image = transform(im.convert("RGB"))  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 -- any decode failure skips just this sample
            _WARN(f"{path}: skipping corrupt sample {key!r}: {type(exc).__name__}: {exc}")
            return None
        ids = [opts.tokenizer.encode(c) for c in meta["captions"]]
        if opts.word_dropout > 0:
            ids = [word_dropout(t, opts.tokenizer, opts.word_dropout, rng) for t in ids]
        return {
            "image": image,
            "tokens": ids,
            "image_id": meta["image_id"],
            "caption_ids": meta["caption_ids"],
            "captions": meta["captions"],
        }


def _drop_regions(regions_RC: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each region independently with probability p, keeping at least one."""
    if p <= 0:
        return regions_RC
    keep = rng.random(regions_RC.shape[0]) >= p
    if not keep.any():
        keep[rng.integers(regions_RC.shape[0])] = True
    return regions_RC[keep]


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
    """Stack B decoded samples into a `Batch` (regions and tokens right-padded)."""
    images = [s["image"] for s in samples]
    if images[0].ndim == 2:  # regions (R, C), R varies under region dropout
        R = max(x.shape[0] for x in images)
        batch_images = torch.zeros(len(images), R, images[0].shape[1])
        image_mask = torch.zeros(len(images), R, dtype=torch.bool)
        for i, x in enumerate(images):
            batch_images[i, : x.shape[0]] = torch.from_numpy(x)
            image_mask[i, : x.shape[0]] = True
    else:  # uint8 pixels (3, H, W)
        batch_images, image_mask = _normalise(torch.from_numpy(np.stack(images))), None
    captions = [t for s in samples for t in s["tokens"]]
    T = max(len(t) for t in captions)
    tokens = torch.full((len(captions), T), pad_id, dtype=torch.long)
    token_mask = torch.zeros(len(captions), T, dtype=torch.bool)
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
        skipped=skipped,
        captions=[c for s in samples for c in s["captions"]],
    )


def _as_is(item: Any) -> Any:
    return item


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
        n = len(self.shards.paths)
        if not resampled and n < world * max(num_workers, 1):
            raise ValueError(
                f"{pattern}: {n} shards for {world} ranks x {num_workers} workers; write at least "
                f"{world * max(num_workers, 1)} shards (smaller --shard-size) or use fewer workers"
            )
        if verify:
            self.shards.verify(list(range(rank, n, world)))
        self.opts, self.batch_size, self.rank, self.world = opts, batch_size, rank, world
        self.num_workers, self.seed, self.buffer, self.resampled = (
            num_workers,
            seed,
            shuffle_buffer,
            resampled,
        )
        self.batches_per_epoch = self._batches_per_epoch()
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{pattern}: too few samples for one batch of {batch_size} on each of {world} ranks"
            )

    def _batches_per_epoch(self) -> int:
        if self.resampled:
            return self.shards.num_samples // (self.world * self.batch_size)
        # Which shards a rank gets changes per epoch: plan for the smallest share any rank can get.
        counts = sorted(s.samples for s in self.shards.infos)
        per_rank_min = sum(
            counts[: len(counts) // self.world]
        )  # the world-th share of smallest shards
        return per_rank_min // self.batch_size

    def _shards(self, epoch: int, attempt: int) -> list[tuple[Path, int]]:
        n = len(self.shards.paths)
        if self.resampled:
            rng = _rng(self.seed, epoch, self.rank, attempt, 1)
            mine = [int(i) for i in rng.integers(n, size=max(n // self.world, self.num_workers, 1))]
        else:
            mine = plan_epoch(self.shards, self.seed + 7919 * attempt, epoch, self.world)[self.rank]
        return [(self.shards.paths[i], self.shards.infos[i].samples) for i in mine]

    def _samples(self, epoch: int) -> Iterator[tuple[dict[str, Any] | None, int]]:
        """The rank's samples of `epoch`; when corrupt data leaves the epoch short, its shards
        are read again with a fresh shuffle. A whole pass without one good sample stops it:
        reading the same bad shards again would not help."""
        for attempt in range(MAX_PASSES):
            shards = self._shards(epoch, attempt)
            good = bad = 0
            # Closed explicitly when this generator is, so that its workers shut down here and
            # not in the garbage collector (which would swallow a requeue's SystemExit).
            with contextlib.closing(self._pass(shards, epoch, attempt)) as items:
                for sample, skip in items:
                    good, bad = good + (sample is not None), bad + skip
                    yield sample, skip
            if good == 0:
                names = ", ".join(str(p) for p, _ in shards[:4]) + (", ..." * (len(shards) > 4))
                raise ValueError(
                    f"no readable training sample in a whole pass over rank {self.rank}'s "
                    f"{len(shards)} shard(s) of {self.pattern!r} ({names}): {bad} of "
                    f"{sum(n for _, n in shards)} samples are corrupt or missing"
                )
        raise ValueError(
            f"{self.pattern!r}: {MAX_PASSES} passes over the shards did not fill epoch {epoch}: "
            "most samples are corrupt (see the warnings above)"
        )

    def _pass(
        self, shards: list[tuple[Path, int]], epoch: int, attempt: int
    ) -> Iterator[tuple[dict[str, Any] | None, int]]:
        """One read of `shards` through the DataLoader's workers."""
        stream = _SampleStream(
            shards, self.opts, (self.seed, epoch, self.rank, attempt), self.buffer
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_as_is,  # keep numpy arrays numpy: no per-sample tensor conversion
            # Its own generator: creating workers must not draw from the global RNG, or a
            # resumed run's dropout masks would drift from the uninterrupted run's.
            generator=torch.Generator().manual_seed(
                int(_rng(self.seed, epoch, self.rank, attempt).integers(2**62))
            ),
            persistent_workers=False,
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
        """Exactly `batches_per_epoch - start_batch` batches of epoch `epoch` (deterministic)."""
        produced, pending, skipped = 0, [], 0
        # The sample stream is closed here once the epoch is full, not by the garbage
        # collector, which would swallow an exception raised while its workers shut down.
        with contextlib.closing(self._samples(epoch)) as samples:
            for sample, skip in samples:
                skipped += skip
                if sample is None:
                    continue
                pending.append(sample)
                if len(pending) < self.batch_size:
                    continue
                if produced >= start_batch:
                    yield collate(pending, self.opts.tokenizer.pad_id, skipped)
                produced, pending, skipped = produced + 1, [], 0
                if produced == self.batches_per_epoch:
                    return


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
        """Corrupt samples skipped in the last full iteration."""

    def __len__(self) -> int:
        """Images in this rank's slice."""
        return self.stop - self.start

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        pos, mine = 0, []
        for path, info in zip(self.shards.paths, self.shards.infos, strict=True):
            if pos + info.samples > self.start and pos < self.stop:
                mine.append((path, info.samples, pos))
            pos += info.samples
        if not mine:
            return
        stream = _SampleStream([(p, n) for p, n, _ in mine], self.opts, (0,), buffer=1)
        pos, pending, skipped = mine[0][2], [], 0
        self.skipped = 0
        for sample, skip in stream._items():  # in-process: keeps file order exactly
            pos += skip
            skipped += skip
            self.skipped += skip
            if sample is not None and self.start <= pos < self.stop:
                pending.append(sample)
            pos += sample is not None
            if len(pending) == self.batch_size or (pending and pos >= self.stop):
                yield collate(pending, self.opts.tokenizer.pad_id, skipped)
                pending, skipped = [], 0
            if pos >= self.stop:
                break


def build_train_reader(
    cfg: DataConfig, kind: str, tokenizer: Tokenizer, rank: int, world: int, seed: int
) -> TrainReader:
    """The training reader of `data.train_shards`; `data.batch_size` is the global batch."""
    if cfg.train_shards is None:
        raise ValueError("config key 'data.train_shards' is not set")
    if cfg.batch_size % world:
        raise ValueError(f"'data.batch_size'={cfg.batch_size} does not split over {world} ranks")
    opts = SampleOptions(
        kind,
        tokenizer,
        True,
        cfg.image_size,
        cfg.image_transform,
        cfg.hflip,
        cfg.region_dropout,
        cfg.word_dropout,
    )
    return TrainReader(
        cfg.train_shards,
        opts,
        cfg.batch_size // world,
        rank,
        world,
        cfg.num_workers,
        seed,
        cfg.shuffle_buffer,
        cfg.resampled,
        cfg.verify_checksums,
    )


def build_eval_reader(
    cfg: DataConfig, pattern: str, kind: str, tokenizer: Tokenizer, rank: int = 0, world: int = 1
) -> EvalReader:
    """An evaluation reader over `pattern` (no augmentation, index order, rank's slice)."""
    opts = SampleOptions(kind, tokenizer, False, cfg.image_size, cfg.image_transform)
    return EvalReader(pattern, opts, cfg.eval_batch_size, rank, world, align=cfg.eval_batch_size)
