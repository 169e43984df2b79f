"""Samples: a raw shard sample decoded into arrays (image pixels through the official DivE
transforms, or region features; captions tokenised, with the training dropouts), and decoded
samples collated into a `Batch`.

Shape legend: B images per batch, R regions, C region width, T tokens, M captions (5B for
COCO and Flickr30K).

Randomness (region and word dropout, random crops) comes from a seed per sample, so what a
sample becomes does not depend on which rank or data worker reads it, nor on what was read
before it. A sample that fails to decode is skipped, counted and warned about (`WARN`).
"""

from __future__ import annotations

import io
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from setdiv.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceImages,
    Encoded,
    image_transform,
    normalise,
)
from setdiv.data.noise import CaptionNoise
from setdiv.data.remote import DEFAULT_RETRY, Retry
from setdiv.data.shards import decode_meta
from setdiv.data.text import Tokenizer, word_dropout
from setdiv.data.web_shards import web_meta
from setdiv.errors import UserError

if TYPE_CHECKING:
    from setdiv.config import DataConfig

__all__ = [
    "Batch",
    "SampleOptions",
    "WARN",
    "collate",
    "decode_sample",
    "image_file_pixels",
    "sample_options",
]

log = logging.getLogger(__name__)


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


WARN = _Warner()
"""The process's bad-sample warner (rate-limited; `WARN.count` is the running total)."""


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
    train_transform: str = "random"
    """random (crop, flip) | test: training images through the test transform."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Pixel normalisation (RGB, 0-1 scale), the image tower's."""
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    """crop style, test: Resize(size / crop_pct) + CenterCrop(size)."""
    fast_decode: bool = True
    """JPEGs decode at the smallest DCT scale covering the transform (`images.py`)."""
    image_decode: str = "workers"
    """workers | device: training JPEGs stay encoded until the batch moves to its device."""
    format: str = "auto"
    """auto | setdiv | img2dataset (`web_shards.web_meta`) | features (`setdiv extract`); the
    readers resolve it from their shards."""
    caption_key: str | None = None
    """img2dataset: the `.json` field holding the caption (None: `.txt`)."""
    caption_noise: float = 0.0
    """Training: the share of captions the reader's noise plan replaces (`data.caption_noise`)."""
    caption_noise_seed: int = 0
    noise: CaptionNoise | None = None
    """The plan itself, made by the training reader from its shards."""
    retry: Retry = DEFAULT_RETRY
    """Remote shards: how failed reads are retried (`data.retries`, `data.retry_backoff_s`)."""


def image_file_pixels(
    path: str | Path | BinaryIO, size: int, style: str = "crop", opts: SampleOptions | None = None
) -> Tensor:
    """(1,3,size,size) normalised pixels of an image file (or file object), as evaluation
    reads a test image (`opts`: the data options, whose size and style win). Raises
    UserError for anything Pillow cannot (or will not) decode."""
    opts = opts or SampleOptions("image", None, False, size, style)  # type: ignore[arg-type]
    try:
        with Image.open(path) as im:
            pixels = image_transform(opts, False)(im)
    except (OSError, Image.DecompressionBombError) as exc:
        name = path if isinstance(path, (str, Path)) else "image"
        raise UserError(f"{name}: not a readable image ({exc})") from None
    return normalise(torch.from_numpy(pixels)[None], opts.mean, opts.std)


def _decode(raw: dict, opts: SampleOptions, transform: Callable | None, seed: list[int]) -> dict:
    """A raw sample -> {"image", "tokens", ...}; raises on anything corrupt. `seed` + the
    sample's key drive its region / word dropout and (in a forked torch RNG) its random crop."""
    rng = np.random.default_rng([*seed, zlib.crc32(raw["__key__"].encode())])
    if opts.format == "img2dataset":
        meta = web_meta(raw, opts.caption_key)
    else:
        meta = decode_meta(raw, five=opts.format != "features")
    if opts.noise is not None:  # (training only: the plan's replaced captions)
        meta["captions"] = opts.noise.apply(raw["__url__"], raw["__key__"], meta["captions"])
    if opts.kind == "regions":  # stays numpy until collation: cheaper between processes
        regions_RC = np.load(io.BytesIO(raw["npy"]), allow_pickle=False)
        if regions_RC.ndim != 2 or not np.isfinite(regions_RC).all():
            raise ValueError(f"region array of shape {regions_RC.shape} (or non-finite values)")
        image = _drop_regions(regions_RC, opts.region_dropout, rng)
    else:
        with Image.open(io.BytesIO(raw["jpg"])) as im, torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue a CUDA seeding call
            # (with its stack trace) on a CUDA build, for every sample.
            torch.default_generator.manual_seed(int(rng.integers(2**62)))
            image = transform(im, raw["jpg"])  # type: ignore[misc]
    ids = [opts.tokenizer.encode(c) for c in meta["captions"]]
    if opts.word_dropout > 0:
        ids = [word_dropout(t, opts.tokenizer, opts.word_dropout, rng) for t in ids]
    keys = ("image_id", "caption_ids", "captions")
    out = {"image": image, "tokens": ids, **{k: meta[k] for k in keys}}
    return out | ({"retries": raw["__retries__"]} if raw.get("__retries__") else {})


def _drop_regions(regions_RC: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Drop each region independently with probability p, keeping at least one."""
    if p <= 0:
        return regions_RC
    keep = rng.random(regions_RC.shape[0]) >= p
    if not keep.any():
        keep[rng.integers(regions_RC.shape[0])] = True
    return regions_RC[keep]


def decode_sample(
    raw: dict, opts: SampleOptions, transform: Callable | None, seed: list[int]
) -> dict | None:
    """`_decode`, or None (warned and counted) for a sample that does not decode."""
    try:
        return _decode(raw, opts, transform, seed)
    except Exception as exc:  # noqa: BLE001 -- any decode failure skips just this sample
        key = raw.get("__key__")
        WARN(f"{raw.get('__url__')}: skipping corrupt sample {key!r}: {type(exc).__name__}: {exc}")
        return None


# --- batches ----------------------------------------------------------------------------------


@dataclass
class Batch:
    images: Tensor | DeviceImages
    """(B,R,C) padded region features, or (B,3,H,W) pixels (`DeviceImages` with
    data.image_decode=device: decoded by `.to(device)`)."""
    image_mask: Tensor | None
    """(B,R) bool validity of regions; None for pixels."""
    tokens: Tensor
    """(M,T) token ids, image-major: image b's captions follow image b-1's (5 each for COCO
    and Flickr30K, so caption c belongs to image c // 5; `caption_counts` in general)."""
    token_mask: Tensor
    """(M,T) bool validity of tokens."""
    image_ids: list[str]
    caption_ids: list[Any]
    skipped: int = 0
    """Corrupt samples skipped while this batch was read."""
    retries: int = 0
    """Failed remote reads retried while this batch was read (`remote.py`)."""
    captions: list[str] = field(default_factory=list)
    """The M caption texts, image-major."""
    caption_counts: list[int] = field(default_factory=list)
    """(B,) captions of each image."""


def collate(
    samples: list[dict[str, Any]], pad_id: int, skipped: int = 0, opts: SampleOptions | None = None
) -> Batch:
    """Stack B decoded samples into a `Batch` (regions and tokens right-padded, pixels
    normalised with `opts`' mean and std, default ImageNet's); `skipped` adds to the samples'
    own "skipped" counts."""
    images = [s["image"] for s in samples]
    if getattr(images[0], "ndim", 3) == 2:  # regions (R, C), R varies under region dropout
        batch_images = pad_sequence([torch.from_numpy(x) for x in images], batch_first=True)
        image_mask = torch.arange(batch_images.shape[1]) < torch.tensor([[len(x)] for x in images])
        batch_images = batch_images.float()
    else:  # uint8 pixels (3, H, W), or JPEGs left for the device
        mean, std = (opts.mean, opts.std) if opts is not None else (IMAGENET_MEAN, IMAGENET_STD)
        if any(isinstance(x, Encoded) for x in images):
            assert opts is not None
            batch_images = DeviceImages(images, opts.image_size, mean, std, opts.interpolation)
        else:
            batch_images = normalise(torch.from_numpy(np.stack(images)), mean, std)
        image_mask = None
    captions = [torch.tensor(t, dtype=torch.long) for s in samples for t in s["tokens"]]
    tokens = pad_sequence(captions, batch_first=True, padding_value=pad_id)
    token_mask = torch.arange(tokens.shape[1]) < torch.tensor([[len(t)] for t in captions])
    return Batch(
        batch_images,
        image_mask,
        tokens,
        token_mask,
        image_ids=[s["image_id"] for s in samples],
        caption_ids=[c for s in samples for c in s["caption_ids"]],
        skipped=skipped + sum(s.get("skipped", 0) for s in samples),
        retries=sum(s.get("retries", 0) for s in samples),
        captions=[c for s in samples for c in s["captions"]],
        caption_counts=[len(s["tokens"]) for s in samples],
    )


def _image_decode(cfg: DataConfig, kind: str, train: bool) -> str:
    if cfg.image_decode == "device" and kind != "image":
        raise UserError(
            f"data.image_decode=device decodes JPEGs on the device; this model reads {kind}, "
            "not images: use workers"
        )
    return cfg.image_decode if train else "workers"  # (evaluation decodes in its readers)


def sample_options(
    cfg: DataConfig, kind: str, tokenizer: Tokenizer, train: bool, augment: bool = True
) -> SampleOptions:
    """The options `cfg` (data config) gives: its null preprocessing keys take the
    torchvision CNNs' values (ImageNet normalisation, bilinear, crop 0.875); a timm or
    open_clip tower fills them in from its own config (`setdiv.model.towers`) before."""
    return SampleOptions(
        kind,
        tokenizer,
        train,
        cfg.image_size,
        cfg.image_transform,
        cfg.hflip,
        cfg.region_dropout if augment else 0.0,
        cfg.word_dropout if augment else 0.0,
        cfg.train_transform,
        tuple(cfg.image_mean) if cfg.image_mean is not None else IMAGENET_MEAN,  # type: ignore[arg-type]
        tuple(cfg.image_std) if cfg.image_std is not None else IMAGENET_STD,  # type: ignore[arg-type]
        cfg.interpolation or "bilinear",
        cfg.crop_pct or 0.875,
        cfg.fast_decode,
        _image_decode(cfg, kind, train),
        cfg.format,
        cfg.caption_key,
        cfg.caption_noise if train else 0.0,
        cfg.caption_noise_seed,
        retry=Retry(cfg.retries, cfg.retry_backoff_s),
    )
