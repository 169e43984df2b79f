"""The typed config tree: every default lives here, YAML files are deltas.

`load(paths, overrides)` merges the YAML files in order over the dataclass defaults, then the
dotted `key=value` overrides. An unknown key or a value of the wrong type fails at load time
with a `ConfigError` naming the file (or override) and the dotted path. The resolved config is
written next to a run with `save` and read back identically with `load`.

This module is the only reader of YAML and of override strings in setdiv.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, TupleConfig
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "Config",
    "ConfigError",
    "ImageEncoderConfig",
    "LR_GROUPS",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "SetModuleConfig",
    "SimilarityConfig",
    "TextEncoderConfig",
    "PATH_KEYS",
    "load",
    "override",
    "paths",
    "save",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class SimilarityConfig:
    name: str = "smooth_chamfer"
    """Registry name in `setdiv.similarity`: smooth_chamfer | chamfer | mil | match_prob."""
    alpha: float = 16.0
    """smooth_chamfer: the scaling parameter alpha (inverse temperature of the soft max)."""
    mp_a: float = 1.0
    """match_prob: slope a of sigmoid(a * s + b)."""
    mp_b: float = 0.0
    """match_prob: offset b of sigmoid(a * s + b)."""
    block_size: int = 512
    """Sets per block along each axis: peak extra memory is O(block_size^2 * K * L)."""


@dataclass
class SetModuleConfig:
    name: str = "slot"
    """Registry name in `setdiv.model.set_modules`: slot | transformer | pienet."""
    num_embeds: int = 4
    """K: the number of embeddings per set."""
    num_iters: int = 4
    """T: how often the one weight-shared aggregation block is applied (slot, transformer)."""
    num_heads: int = 4
    """Attention heads of the aggregation block (pienet: attention maps = num_embeds)."""
    head_dim: int = 512
    """Width of each attention head (official: 512, so q/k/v are 4 x 512 = 2048 wide)."""
    mlp_ratio: int = 4
    """Hidden width of the slot MLP as a multiple of embed_dim."""
    dropout: float = 0.1
    """Dropout inside the slot MLP (pienet: on the attention-pooled residual)."""
    compat_mask: bool = False
    """Reproduce the official masking (before the slot softmax): padded inputs keep 1/K weight."""
    pie_hidden: int | None = None
    """pienet: hidden width of the attention MLP; null = input width // 2 (official for image
    and bi-GRU text; the official BERT text PIE-Net uses model.text.word_dim // 2, which
    `build_model` fills in)."""


@dataclass
class ImageEncoderConfig:
    name: str = "region"
    """Registry name in `setdiv.model.encoders`: region | resnet152 | resnext101_32x8d."""
    feature_dim: int = 2048
    """region: width of the precomputed region features (BUTD: 2048)."""
    weights: str | None = None
    """cnn: local path of the ImageNet/WSL state dict (.pth or .safetensors); null = random init."""
    freeze_bn: bool = False
    """cnn: keep BatchNorm statistics and affine parameters fixed (eval mode, no grad)."""
    dropout: float = 0.1
    """Dropout on the projected local features (official: 0.1)."""


@dataclass
class TextEncoderConfig:
    name: str = "bigru"
    """Registry name in `setdiv.model.encoders`: bigru | bert."""
    vocab_path: str | None = None
    """bigru: vocabulary file (.json written by setdiv, or an official vocab .pkl)."""
    tokenizer: str = "nltk"
    """bigru: caption tokenisation, nltk (Treebank-style, as the official vocabularies were
    built) | regex."""
    vocab_size: int | None = None
    """bigru: vocabulary size when vocab_path is null (random-init models, tests, `info`)."""
    glove_path: str | None = None
    """bigru: GloVe text file used to initialise the (trainable) word vectors; null = random."""
    word_dim: int = 300
    """bigru: word-vector width (GloVe: 300)."""
    hidden_dim: int = 1024
    """bigru: GRU hidden width per direction."""
    num_layers: int = 1
    """bigru: stacked GRU layers."""
    bert_path: str | None = None
    """bert: local directory holding config.json and the weights (never downloaded); null =
    random init with the bert-base-uncased shape."""
    bert_global: str = "cls"
    """bert: global feature from the projected [CLS] state (cls) or a max pool over tokens (max)."""
    dropout: float = 0.1
    """bigru: dropout on the word vectors and on the global feature (official: 0.1)."""


@dataclass
class ModelConfig:
    embed_dim: int = 1024
    """D: width of every set element."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_set: SetModuleConfig = field(default_factory=SetModuleConfig)
    text_set: SetModuleConfig = field(default_factory=SetModuleConfig)


@dataclass
class LossConfig:
    margin: float = 0.2
    """Triplet margin m (0.2 for region features, 0.1 for CNN grids)."""
    hardest_negatives: bool = True
    """Hardest negative per positive (VSE++); false = mean over all negatives."""
    mean_negative_epochs: int = 0
    """Warm-up: the first E epochs use the mean over negatives instead of the hardest."""
    reduction: str = "mean"
    """How hinge terms are reduced: mean (official DivE) | sum (VSE++)."""
    mmd_weight: float = 0.01
    """Weight of the MMD regulariser between image and caption elements."""
    div_weight: float = 0.01
    """Weight of the diversity regulariser on the pre-fusion slots."""


LR_GROUPS = {
    "image_backbone": 1.0,
    "image_head": 0.1,
    "image_set": 0.1,
    "text_backbone": 1.0,
    "text_encoder": 1.0,
    "text_set": 0.1,
}
"""Parameter groups and their LR multipliers in the official train.py: the image encoder's
non-CNN part shares `img_pie_lr_scale` with the image set module, the text set module has
`txt_pie_lr_scale`, the text encoder (BERT included) `txt_lr_scale`, the CNN x1."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Base learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_mult: dict[str, float] = field(default_factory=lambda: dict(LR_GROUPS))
    """LR multiplier per parameter group (`setdiv info` lists the groups with their sizes):
    image_backbone (CNN), image_head (projection + residual MLP of the image encoder),
    image_set, text_backbone (BERT), text_encoder (word vectors + bi-GRU, or BERT's projection),
    text_set. Keys left out keep their defaults, the official script's values."""
    schedule: str = "cosine"
    """cosine (annealed per iteration over all epochs) | step (x step_gamma every step_epochs)."""
    step_epochs: int = 10
    """step: epochs between LR decays."""
    step_gamma: float = 0.1
    """step: decay factor."""
    warmup_iters: int = 0
    """Linear LR warm-up iterations before the schedule."""
    freeze_epochs: int = 0
    """The groups in `freeze_groups` get no gradient and no optimizer update during the first
    E epochs; their optimizer state starts fresh when they unfreeze."""
    freeze_groups: list[str] = field(default_factory=lambda: ["image_backbone"])
    """Parameter groups frozen during the first `freeze_epochs` (official: the CNN only)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""


@dataclass
class DataConfig:
    train_shards: str | None = None
    """Training shards: a brace pattern or glob of .tar files."""
    val_shards: str | None = None
    """Validation shards (evaluated with the full protocol)."""
    batch_size: int = 200
    """Images per global batch; each comes with its 5 captions."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    image_size: int = 224
    """cnn: side of the training crop and of the test image."""
    image_transform: str = "crop"
    """cnn: crop (RandomResizedCrop; test Resize(size/0.875) + CenterCrop) | gpo512
    (RandomResizedCrop with scale 0.36-1; test Resize((size, size))), as the official code."""
    hflip: bool = True
    """cnn: random horizontal flip in training (official, though captions mention left/right)."""
    region_dropout: float = 0.2
    """Fraction of regions dropped per training image."""
    word_dropout: float = 0.2
    """Probability that a token is perturbed (50% mask, 10% random word, 40% deleted)."""
    shuffle_buffer: int = 1000
    """Samples held per worker for sample-level shuffling (shards are shuffled too)."""
    resampled: bool = False
    """Draw shards with replacement (epochs of equal length) instead of one pass over all."""
    verify_checksums: bool = True
    """Check every shard's sha256 against its index before training starts."""
    eval_batch_size: int = 256
    """Images per encoding batch in evaluation (captions: 5x)."""
    val_protocol: str = "coco"
    """Protocol of the validation split: coco | f30k (selects the whole-set RSUM)."""


@dataclass
class TrainConfig:
    epochs: int = 80
    """Training epochs."""
    seed: int = 0
    """Seed of model init, data order and dropout."""
    precision: str = "bf16"
    """fp32 | bf16 | fp16: autocast with fp32 weights and optimizer state, as the official code
    (fp16 adds dynamic loss scaling); similarities, the loss and LayerNorms run in fp32."""
    half_weights: bool = False
    """Keep the parameters themselves in bf16 / fp16 (DeepSpeed's bf16 / fp16 modes, fp32
    master copies in the optimizer): less memory for memory-bound models, not the recipe."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    log_every: int = 20
    """Steps between metrics.jsonl / TensorBoard records."""
    ckpt_every: int = 1000
    """Steps between checkpoints (plus one at every epoch end)."""
    keep_last: int = 3
    """Checkpoints kept besides `best`."""
    max_nonfinite: int = 5
    """Consecutive non-finite losses (each step skipped) after which training stops."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _error(source: str, exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{source}: bad config key '{key}': {msg}")


def _merge(base: DictConfig, delta: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, delta)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _error(source, exc) from None


def load(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Defaults, then each YAML file in order, then dotted overrides such as `model.embed_dim=8`.

    Raises `ConfigError` naming the file or override and the dotted key on an unknown key, a
    wrong type or a malformed override.
    """
    cfg = OmegaConf.structured(Config)
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            delta = OmegaConf.load(path)  # YAML safe loading
        except Exception as exc:  # noqa: BLE001 -- yaml errors come in many classes
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if delta is None or not isinstance(delta, DictConfig):
            raise ConfigError(f"{path}: top level must be a mapping")
        cfg = _merge(cfg, delta, str(path))
    return _overridden(cfg, overrides)


def override(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with dotted `key=value` overrides applied and validated (as `load` does)."""
    return _overridden(OmegaConf.structured(cfg), overrides)


def _overridden(cfg: DictConfig, overrides: Sequence[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    validate(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


_CHOICES = {
    "similarity.name": ("smooth_chamfer", "chamfer", "mil", "match_prob"),
    "model.image.name": ("region", "resnet152", "resnext101_32x8d"),
    "model.text.name": ("bigru", "bert"),
    "loss.reduction": ("mean", "sum"),
    "optim.schedule": ("cosine", "step"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "model.text.bert_global": ("cls", "max"),
    "model.text.tokenizer": ("nltk", "regex"),
    "data.val_protocol": ("coco", "f30k"),
    "data.image_transform": ("crop", "gpo512"),
}


def _float_leaves(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(node, DictConfig):
        return [leaf for key in node for leaf in _float_leaves(node.get(key), f"{prefix}{key}.")]
    if isinstance(node, ListConfig | TupleConfig):
        return [
            leaf for i, item in enumerate(node) for leaf in _float_leaves(item, f"{prefix}{i}.")
        ]
    return [(prefix[:-1], node)] if isinstance(node, float) else []


def validate(cfg: DictConfig) -> None:
    """Value checks the type system cannot express; raises `ConfigError` naming the key."""
    for key, value in _float_leaves(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"bad config key '{key}': {value} is not a finite number")
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"bad config key '{key}': {value!r} is not one of {choices}")
    positive = (
        "model.embed_dim",
        "similarity.block_size",
        "similarity.alpha",
        "data.batch_size",
        "data.eval_batch_size",
        "data.image_size",
        "train.epochs",
        "train.log_every",
        "train.ckpt_every",
        "train.keep_last",
        "train.max_nonfinite",
        "optim.lr",
        "optim.step_epochs",
        "model.text.word_dim",
        "model.text.hidden_dim",
        "model.text.num_layers",
        "model.image.feature_dim",
    )
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"bad config key '{key}': must be > 0")
    for key in (
        "data.num_workers",
        "optim.warmup_iters",
        "optim.freeze_epochs",
        "loss.mean_negative_epochs",
        "loss.margin",
        "optim.grad_clip",
    ):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"bad config key '{key}': must be >= 0")
    for key in (
        "data.region_dropout",
        "data.word_dropout",
        "model.image.dropout",
        "model.text.dropout",
    ):
        if not 0 <= OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"bad config key '{key}': must be in [0, 1)")
    for side in ("image_set", "text_set"):
        for key in ("num_embeds", "num_iters", "num_heads", "head_dim", "mlp_ratio"):
            if OmegaConf.select(cfg, f"model.{side}.{key}") < 1:
                raise ConfigError(f"bad config key 'model.{side}.{key}': must be >= 1")
        name = OmegaConf.select(cfg, f"model.{side}.name")
        if name not in ("slot", "transformer", "pienet"):
            raise ConfigError(
                f"bad config key 'model.{side}.name': {name!r} is not slot, transformer or pienet"
            )
    for key, group_names in (
        ("optim.lr_mult", cfg.optim.lr_mult.keys()),
        ("optim.freeze_groups", cfg.optim.freeze_groups),
    ):
        unknown = sorted(set(group_names) - set(LR_GROUPS))
        if unknown:
            raise ConfigError(
                f"bad config key '{key}': unknown parameter group(s) {unknown}; "
                f"groups: {sorted(LR_GROUPS)}"
            )
    if any(v < 0 for v in cfg.optim.lr_mult.values()):
        raise ConfigError("bad config key 'optim.lr_mult': multipliers must be >= 0")
    if cfg.train.half_weights and cfg.train.precision == "fp32":
        raise ConfigError("train.half_weights needs train.precision bf16 or fp16")
    if not 0 <= cfg.train.zero_stage <= 3:
        raise ConfigError("bad config key 'train.zero_stage': must be 0, 1, 2 or 3")
    text = cfg.model.text
    if text.vocab_path is not None and text.vocab_size is not None:
        raise ConfigError(
            "model.text.vocab_path and model.text.vocab_size are both set: "
            "the size comes from the vocabulary file, drop vocab_size"
        )


PATH_KEYS = (
    "model.image.weights",
    "model.text.vocab_path",
    "model.text.glove_path",
    "model.text.bert_path",
    "data.train_shards",
    "data.val_shards",
)
"""Dotted keys that name local files (the `*_shards` keys: brace / glob patterns). A run checks
them where it starts; a launcher on another machine can only warn about them."""


def paths(cfg: Config) -> dict[str, str]:
    """The file and shard paths `cfg` names, by dotted key (unset keys left out)."""
    node = OmegaConf.structured(cfg)
    return {k: v for k in PATH_KEYS if (v := OmegaConf.select(node, k)) is not None}


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (every key, defaults included)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config; `load([path])` returns an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
