"""The model's config sections (`model.*`, `similarity`): encoders, set modules, the set
similarity, and the registry names each may take. Choices are `Literal` types with the
registries' names spelled out (tests/test_config.py checks them against the registries)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from setdiv.config.rules import fraction, positive

__all__ = [
    "ImageEncoderConfig",
    "ImageEncoderName",
    "ModelConfig",
    "SetModuleConfig",
    "SetModuleName",
    "SimilarityConfig",
    "SimilarityName",
    "TextEncoderConfig",
    "TextEncoderName",
    "TokenizerName",
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
    kernel: Literal["auto", "triton", "torch"] = "auto"
    """smooth_chamfer: auto (the fused Triton kernel on CUDA, the torch path elsewhere) |
    triton | torch, to force either (docs/kernels.md)."""

    def _conflict(self) -> tuple[str, str] | None:
        if self.kernel == "triton" and self.name != "smooth_chamfer":
            return "kernel", f"the Triton kernel computes smooth_chamfer only, not {self.name}"
        return None


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
