"""Readers built from a config: the training reader of `data.train_shards` / `train_sources`
(the global batch split over ranks), evaluation readers, the frozen-feature cache's shards in
place of images (`data.features`)."""

from __future__ import annotations

from setdiv.config import DataConfig
from setdiv.data.features import cached_shards
from setdiv.data.reader import EvalReader, TrainReader
from setdiv.data.remote import Retry
from setdiv.data.samples import sample_options
from setdiv.data.shards import ShardSet
from setdiv.data.text import Tokenizer
from setdiv.errors import UserError

__all__ = [
    "build_eval_reader",
    "build_train_reader",
    "feature_shards",
    "per_rank_batch_size",
    "resolve_shards",
]


def feature_shards(cfg: DataConfig, pattern: str) -> str:
    """`pattern`'s entries in the feature cache `data.features` (`setdiv.data.features`), or
    `pattern` itself without a cache. A shard without an entry there is an error naming it."""
    return pattern if cfg.features is None else cached_shards(cfg.features, pattern)


def resolve_shards(cfg: DataConfig, pattern: str, kind: str | None = None) -> ShardSet:
    """`pattern`'s shards in the config's format (`data.format`, auto-detected as the readers
    do, with `data.caption_key`): what a command checks before starting ranks."""
    retry = Retry(cfg.retries, cfg.retry_backoff_s)
    return ShardSet.resolve(pattern, kind, cfg.format, cfg.caption_key, retry)


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
    if tokenizer.mask_id < 0 and cfg.word_dropout > 0:
        raise UserError(
            f"config key 'data.word_dropout' is {cfg.word_dropout}: the text tower's tokenizer "
            "has no mask token (open_clip, some Hugging Face models); set data.word_dropout=0"
        )
    if cfg.train_shards is None and not cfg.train_sources:
        raise UserError("config key 'data.train_shards' (or 'data.train_sources') is not set")
    cached = kind == "regions" and cfg.features is not None  # tower features, not images
    pattern: str | list[tuple[str, float]] = (
        (feature_shards(cfg, cfg.train_shards) if cached else cfg.train_shards)
        if cfg.train_shards
        else [
            (feature_shards(cfg, source.shards) if cached else source.shards, source.weight)
            for source in cfg.train_sources
        ]
    )
    opts = sample_options(cfg, kind, tokenizer, train=True)
    return TrainReader(
        pattern, opts, batch_size or per_rank_batch_size(cfg, world), rank, world,
        cfg.num_workers, seed, cfg.shuffle_buffer, cfg.resampled, cfg.verify_checksums,
        cfg.samples_per_epoch,
    )  # fmt: skip


def build_eval_reader(
    cfg: DataConfig, pattern: str, kind: str, tokenizer: Tokenizer, rank: int = 0, world: int = 1
) -> EvalReader:
    """An evaluation reader over `pattern` (no augmentation, index order, rank's slice); a
    model reading cached tower features ("regions" with `data.features`) reads them."""
    if kind == "regions" and cfg.features is not None:
        pattern = feature_shards(cfg, pattern)
    opts = sample_options(cfg, kind, tokenizer, train=False, augment=False)
    return EvalReader(pattern, opts, cfg.eval_batch_size, rank, world, align=cfg.eval_batch_size)
