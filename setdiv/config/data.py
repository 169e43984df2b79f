"""The data section (`data.*`): shards and their sources, the loader, image and caption
transforms, the evaluation protocol of the validation split. docs/data.md explains formats
and towers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from setdiv.config.rules import fraction, non_negative, positive, ruled

__all__ = ["DataConfig", "Protocol", "SourceConfig"]

Protocol = Literal["coco", "f30k", "web"]
"""Evaluation protocols. coco: 5K + 1K folds (+ ECCV/CxC); f30k: 1K; web: whole-set recalls,
any caption count."""


@dataclass
class SourceConfig:
    shards: str = ""
    """A brace pattern or glob of .tar files (setdiv or img2dataset), local or URLs."""
    weight: float = 1.0
    """Relative share of the training samples drawn from this source."""


@dataclass
class DataConfig:
    train_shards: str | None = None
    """Training shards: a brace pattern or glob of .tar files, local or URLs (https://,
    s3://, pipe:CMD; docs/data.md)."""
    train_sources: list[SourceConfig] = field(default_factory=list)
    """Instead of train_shards: several sources mixed by weight ([{shards, weight}, ...]),
    drawn with replacement (resampled) into epochs of `samples_per_epoch`."""
    samples_per_epoch: int | None = None
    """Samples in one epoch (all ranks) when resampling; null: as many as the shards hold."""
    val_shards: str | None = None
    """Validation shards (evaluated with the full protocol)."""
    batch_size: int = positive(200)
    """Images per global batch; each comes with its 5 captions."""
    num_workers: int = non_negative(2)
    """Loader worker processes per rank."""
    image_size: int = positive(224)
    """cnn: side of the training crop and of the test image."""
    image_transform: Literal["crop", "gpo512"] = "crop"
    """cnn: crop (RandomResizedCrop; test Resize(size/0.875) + CenterCrop) | gpo512
    (RandomResizedCrop with scale 0.36-1; test Resize((size, size))), as the official code."""
    hflip: bool = True
    """cnn: random horizontal flip in training (official, though captions mention left/right)."""
    region_dropout: float = fraction(0.2)
    """Fraction of regions dropped per training image."""
    word_dropout: float = fraction(0.2)
    """Probability that a token is perturbed (50% mask, 10% random word, 40% deleted)."""
    shuffle_buffer: int = 1000
    """Samples held per worker for sample-level shuffling (shards are shuffled too)."""
    resampled: bool = False
    """Draw shards with replacement (epochs of equal length) instead of one pass over all."""
    retries: int = non_negative(3)
    """Remote shards (https://, s3://, pipe:): how often a failed open or read is retried,
    reopening at the byte reached, before the shard's remaining samples are skipped and
    counted like a truncated tar's."""
    retry_backoff_s: float = ruled(1.0, lambda v: None if 0 <= v < math.inf else "must be >= 0")
    """Seconds before the first retry of a remote read; doubles with each further one."""
    verify_checksums: bool = True
    """Check every shard's sha256 against its index before training starts."""
    eval_batch_size: int = positive(256)
    """Images per encoding batch in evaluation (captions: 5x)."""
    val_protocol: Protocol = "coco"
    """Protocol of the validation split (selects the whole-set RSUM)."""
    image_mean: tuple[float, float, float] | None = None
    """Pixel normalisation mean (RGB, 0-1); null: the image tower's own (ImageNet's for the
    torchvision CNNs; timm and open_clip towers: their pretrained config)."""
    image_std: tuple[float, float, float] | None = None
    """Pixel normalisation std; null: the image tower's own."""
    interpolation: Literal["bilinear", "bicubic"] | None = None
    """Resize interpolation; null: the image tower's own (bilinear for the CNNs)."""
    crop_pct: float | None = None
    """crop: the test image is resized to image_size / crop_pct, then centre-cropped; null: the
    image tower's own (0.875 for the CNNs)."""
    fast_decode: bool = True
    """JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8) that still covers what the image
    transform cuts out, instead of at full size (docs/data.md: speed, pixel difference); false:
    decode every image whole, as the official code."""
    image_decode: Literal["workers", "device"] = "workers"
    """Training JPEGs: decoded by the data workers (workers), or left encoded until the batch
    reaches the training device and decoded there, nvJPEG on a GPU (device; the worker only
    reads headers and draws crops). Evaluation decodes in its readers either way."""
    train_transform: Literal["random", "test"] = "random"
    """Training images: random (crop, flip) or test (the evaluation transform: what a
    feature cache of `setdiv extract` holds)."""
    features: str | None = None
    """A `setdiv extract` output directory: training (and its validation) reads the tower's
    token features of each shard from there, under the shard's own name, in place of images."""
    format: Literal["auto", "setdiv", "img2dataset"] = "auto"
    """Shard layout: setdiv (`setdiv shards`, an index file next to the shards, 5 captions per
    image) | img2dataset (`KEY.jpg` + `KEY.txt` (+ `KEY.json`), one caption per image, read in
    place) | auto (setdiv where an index file lies next to the shards; img2dataset where
    there is none and the first shard holds `.txt` captions)."""
    caption_key: str | None = None
    """img2dataset: take the caption from this field of `KEY.json` instead of `KEY.txt`."""
    caption_noise: float = ruled(0.0, lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    """Noisy-pair benchmark: this fraction of the training captions is replaced, once for the
    whole run, by captions of other images (validation and evaluation data untouched)."""
    caption_noise_seed: int = 0
    """Which captions `caption_noise` replaces, and by which."""

    def _conflict(self) -> tuple[str, str] | None:
        if self.train_sources and self.train_shards is not None:
            return "train_sources", "data.train_shards is set too: give one or the other"
        for i, source in enumerate(self.train_sources):
            if not source.shards:
                return f"train_sources.{i}.shards", "must name shards"
            if not (0 < source.weight < math.inf):
                return f"train_sources.{i}.weight", "must be > 0 and finite"
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.batch_size:
            return "samples_per_epoch", f"must be at least data.batch_size={self.batch_size}"
        return None
