"""The config schema: one dataclass per section, every default, each field's rule and choices.

Ranges are checked after a merge (`positive`, `non_negative`, `fraction` of `rules.py` beside
the fields; a section's `_conflict` between its fields); choices are `Literal` types, the
registry names spelled out (tests/test_config.py checks them against the registries). The
objective's sections live in `objective.py`. Imports nothing from setdiv but `setdiv.errors`,
and no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from setdiv.config.objective import CollapseConfig, LossConfig
from setdiv.config.rules import ConfigError, fraction, non_negative, positive, ruled

__all__ = [
    "CollapseConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ImageEncoderConfig",
    "LR_GROUPS",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "Protocol",
    "SetModuleConfig",
    "SimilarityConfig",
    "TextEncoderConfig",
    "TrainConfig",
]


# --- choices: a value outside them fails at merge (OmegaConf checks Literal types) -------------
# The registries' names, spelled out (tests/test_config.py checks each against its registry:
# a name registered there and not here fails that test). Values stay plain `str`, so
# `cfg.name == "slot"` and YAML round trips hold.

SimilarityName = Literal["smooth_chamfer", "chamfer", "mil", "match_prob"]
"""`setdiv.similarity.SIMILARITIES`."""
SetModuleName = Literal["slot", "transformer", "pienet"]
"""`setdiv.model.set_modules.SET_MODULES`."""
ImageEncoderName = Literal["region", "resnet152", "resnext101_32x8d", "timm", "open_clip"]
"""`setdiv.model.encoders.IMAGE_ENCODERS`."""
TextEncoderName = Literal["bigru", "bert", "open_clip"]
"""`setdiv.model.encoders.TEXT_ENCODERS`."""
TokenizerName = Literal["nltk", "regex"]
"""`setdiv.data.vocab.TOKENIZERS`."""
Protocol = Literal["coco", "f30k", "web"]
"""coco: 5K + 1K folds (+ ECCV/CxC); f30k: 1K; web: whole-set recalls, any caption count."""
"""Evaluation protocols: COCO 5K / 1K folds, Flickr30K 1K."""


@dataclass
class SimilarityConfig:
    name: SimilarityName = "smooth_chamfer"
    """A similarity registered in `setdiv.similarity.SIMILARITIES`."""
    alpha: float = positive(16.0)
    """smooth_chamfer: the scaling parameter alpha (inverse temperature of the soft max)."""
    mp_a: float = 1.0
    """match_prob: slope a of sigmoid(a * s + b)."""
    mp_b: float = 0.0
    """match_prob: offset b of sigmoid(a * s + b)."""
    block_size: int = positive(512)
    """Sets per block along each axis: peak extra memory is O(block_size^2 * K * L)."""


@dataclass
class SetModuleConfig:
    name: SetModuleName = "slot"
    """A set module registered in `setdiv.model.set_modules.SET_MODULES`."""
    num_embeds: int = positive(4)
    """K: the number of embeddings per set."""
    num_iters: int = positive(4)
    """T: how often the one weight-shared aggregation block is applied (slot, transformer)."""
    num_heads: int = positive(4)
    """Attention heads of the aggregation block (pienet: attention maps = num_embeds)."""
    head_dim: int = positive(512)
    """Width of each attention head (official: 512, so q/k/v are 4 x 512 = 2048 wide)."""
    mlp_ratio: int = positive(4)
    """Hidden width of the slot MLP as a multiple of embed_dim."""
    dropout: float = fraction(0.1)
    """Dropout inside the slot MLP (pienet: on the attention-pooled residual)."""
    compat_mask: bool = False
    """Reproduce the official masking (before the slot softmax): padded inputs keep 1/K weight."""
    pie_hidden: int | None = None
    """pienet: hidden width of the attention MLP; null = input width // 2 (official for image
    and bi-GRU text; the official BERT text PIE-Net uses model.text.word_dim // 2, which
    `build_model` fills in)."""


@dataclass
class ImageEncoderConfig:
    name: ImageEncoderName = "region"
    """An image encoder registered in `setdiv.model.encoders.IMAGE_ENCODERS`."""
    feature_dim: int = positive(2048)
    """region: width of the precomputed region features (BUTD: 2048)."""
    weights: str | None = None
    """cnn / timm: local path of the pretrained state dict (.pth or .safetensors); null =
    random init."""
    arch: str | None = None
    """timm / open_clip: the architecture's registry name (timm: vit_tiny_patch16_224,
    convnext_atto, ...; open_clip: ViT-B-16, ...)."""
    grad_checkpointing: bool = False
    """timm / open_clip: recompute the tower's activations in the backward pass (less
    memory, one more forward of the tower per step)."""
    freeze_bn: bool = False
    """cnn: keep BatchNorm statistics and affine parameters fixed (eval mode, no grad)."""
    dropout: float = fraction(0.1)
    """Dropout on the projected local features (official: 0.1)."""


@dataclass
class TextEncoderConfig:
    name: TextEncoderName = "bigru"
    """A text encoder registered in `setdiv.model.encoders.TEXT_ENCODERS`."""
    vocab_path: str | None = None
    """bigru: vocabulary file (.json written by setdiv, or an official vocab .pkl)."""
    tokenizer: TokenizerName = "nltk"
    """bigru: caption tokenisation (`setdiv.data.vocab.TOKENIZERS`): nltk (Treebank-style, as
    the official vocabularies were built) or regex."""
    vocab_size: int | None = None
    """bigru: vocabulary size when vocab_path is null (random-init models, tests, `info`)."""
    glove_path: str | None = None
    """bigru: GloVe text file used to initialise the (trainable) word vectors; null = random."""
    word_dim: int = positive(300)
    """bigru: word-vector width (GloVe: 300)."""
    hidden_dim: int = positive(1024)
    """bigru: GRU hidden width per direction."""
    num_layers: int = positive(1)
    """bigru: stacked GRU layers."""
    bert_path: str | None = None
    """bert: a local Hugging Face encoder directory (config.json, weights, tokenizer files;
    never downloaded): BERT, MiniLM, RoBERTa, DistilBERT, ... as `AutoModel` builds it; null =
    random init with the bert-base-uncased shape."""
    bert_global: Literal["cls", "max"] = "cls"
    """bert: global feature from the projected [CLS] state (cls) or a max pool over tokens (max)."""
    dropout: float = fraction(0.1)
    """bigru: dropout on the word vectors and on the global feature (official: 0.1)."""
    arch: str | None = None
    """open_clip: the model config whose text tower to use (e.g. ViT-B-16)."""
    weights: str | None = None
    """open_clip: local CLIP checkpoint (.safetensors or weights-only torch file) holding the
    text tower; null = random init."""
    grad_checkpointing: bool = False
    """bert / open_clip: recompute the tower's activations in the backward pass."""

    def _conflict(self) -> tuple[str, str] | None:
        if self.grad_checkpointing and self.name == "bigru":
            return "grad_checkpointing", "the bigru text encoder has no checkpointing: use false"
        if self.vocab_path is not None and self.vocab_size is not None:
            return "vocab_size", (
                "model.text.vocab_path is set too: the size comes from the vocabulary file, "
                "drop vocab_size"
            )
        return None


@dataclass
class ModelConfig:
    embed_dim: int = positive(1024)
    """D: width of every set element."""
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_set: SetModuleConfig = field(default_factory=SetModuleConfig)
    text_set: SetModuleConfig = field(default_factory=SetModuleConfig)


LR_GROUPS = {
    "image_backbone": 1.0,
    "image_head": 0.1,
    "image_set": 0.1,
    "text_backbone": 1.0,
    "text_encoder": 1.0,
    "text_set": 0.1,
    "objective": 1.0,
}
"""Parameter groups and their LR multipliers in the official train.py: the image encoder's
non-CNN part shares `img_pie_lr_scale` with the image set module, the text set module has
`txt_pie_lr_scale`, the text encoder (BERT included) `txt_lr_scale`, the CNN x1. Plus the
objective's own parameters (InfoNCE's temperature: x1, no weight decay, as CLIP's)."""

ParamGroup = Literal[tuple(LR_GROUPS)]


def _lr_mults(mult: dict[str, float]) -> str | None:
    unknown = sorted(set(mult) - set(LR_GROUPS))
    if unknown:
        return f"unknown parameter group(s) {unknown}; groups: {sorted(LR_GROUPS)}"
    return None if all(v >= 0 for v in mult.values()) else "multipliers must be >= 0"


@dataclass
class OptimConfig:
    lr: float = positive(1e-3)
    """Base learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_mult: dict[str, float] = field(
        default_factory=lambda: dict(LR_GROUPS), metadata={"check": _lr_mults}
    )
    """LR multiplier (>= 0) per parameter group (`setdiv info` lists the groups with their
    sizes): image_backbone (CNN), image_head (projection + residual MLP of the image encoder),
    image_set, text_backbone (BERT), text_encoder (word vectors + bi-GRU, or BERT's projection),
    text_set, objective (InfoNCE's temperature). Keys left out keep their defaults, the
    official script's values."""
    schedule: Literal["cosine", "step"] = "cosine"
    """cosine (annealed per iteration over all epochs) | step (x step_gamma every step_epochs)."""
    step_epochs: int = positive(10)
    """step: epochs between LR decays."""
    step_gamma: float = 0.1
    """step: decay factor."""
    warmup_iters: int = non_negative(0)
    """Linear LR warm-up iterations before the schedule."""
    freeze_epochs: int = non_negative(0)
    """The groups in `freeze_groups` get no gradient and no optimizer update during the first
    E epochs; their optimizer state starts fresh when they unfreeze."""
    freeze_groups: list[ParamGroup] = field(default_factory=lambda: ["image_backbone"])
    """Parameter groups frozen during the first `freeze_epochs` (official: the CNN only)."""
    grad_clip: float = non_negative(1.0)
    """Max global gradient norm; 0 disables clipping."""


@dataclass
class SourceConfig:
    shards: str = ""
    """A brace pattern or glob of .tar files (setdiv or img2dataset)."""
    weight: float = 1.0
    """Relative share of the training samples drawn from this source."""


@dataclass
class DataConfig:
    train_shards: str | None = None
    """Training shards: a brace pattern or glob of .tar files."""
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


@dataclass
class TrainConfig:
    epochs: int = positive(80)
    """Training epochs."""
    seed: int = 0
    """Seed of model init, data order and dropout."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast with fp32 weights and optimizer state, as the official code (fp16 adds dynamic
    loss scaling); similarities, the loss and LayerNorms run in fp32."""
    half_weights: bool = False
    """Keep the parameters themselves in bf16 / fp16 (DeepSpeed's bf16 / fp16 modes, fp32
    master copies in the optimizer): less memory for memory-bound models, not the recipe."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    log_every: int = positive(20)
    """Steps between metrics.jsonl / TensorBoard records."""
    ckpt_every: int = positive(1000)
    """Steps between checkpoints (plus one at every epoch end)."""
    keep_last: int = positive(3)
    """Checkpoints kept besides `best`."""
    max_nonfinite: int = positive(5)
    """Consecutive non-finite losses (each step skipped) after which training stops."""
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    """What the trainer does when the batch's scores collapse to a constant."""
    dist_timeout: float = ruled(
        300.0, lambda v: None if 0 < v < math.inf else "must be > 0 seconds and finite"
    )
    """Seconds the ranks of a job wait for each other at the rendezvous before failing with a
    message naming the master address and port (collectives keep torch's own timeout)."""

    def _conflict(self) -> tuple[str, str] | None:
        if self.half_weights and self.precision == "fp32":
            return "half_weights", "needs train.precision bf16 or fp16, not fp32"
        return None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
