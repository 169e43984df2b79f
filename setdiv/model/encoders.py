"""Feature extractors: raw inputs -> local features, validity mask, global feature, positions.

Shape legend: B batch, R regions / grid cells / tokens, Cin raw feature width, Din local
feature width handed to the set module, D embedding width, S grid side.

Image encoders (registry `IMAGE_ENCODERS`): `region` (precomputed BUTD features), `resnet152`
and `resnext101_32x8d` (torchvision grids, weights from a local file), `timm` (any timm
architecture) and `open_clip` (a vision tower): `setdiv.model.towers`. Text encoders
(`TEXT_ENCODERS`): `bigru` (GloVe-initialised word vectors + bi-GRU), `bert` (any Hugging Face
encoder from a local directory: BERT, MiniLM, RoBERTa, DistilBERT, ...) and `open_clip` (a CLIP
text tower). Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from setdiv.data.text import config_vocab
from setdiv.data.vocab import load_glove
from setdiv.errors import UserError
from setdiv.model.hf import check_text_encoder
from setdiv.model.layers import Features, ProjectionHead, masked_max
from setdiv.model.positional import sine_positions_1d, sine_positions_2d
from setdiv.model.weights import hf_config, hf_pretrained, load_fitting, load_state_dict_file
from setdiv.registry import Registry

if TYPE_CHECKING:  # setdiv.config reads the registries' names: type hints only, no cycle
    from setdiv.config import ImageEncoderConfig, TextEncoderConfig

__all__ = [
    "IMAGE_ENCODERS",
    "TEXT_ENCODERS",
    "HFTextEncoder",
    "ImageEncoder",
    "BiGRUEncoder",
    "CNNGridEncoder",
    "Features",
    "RegionEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "image_input_kind",
]

log = logging.getLogger(__name__)


class RegionEncoder(nn.Module):
    """Precomputed detector regions (B,R,Cin) -> projected regions, max-pooled global feature."""

    backbone = None

    def __init__(self, cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> None:
        super().__init__()
        del pretrained  # nothing pretrained: region features come precomputed
        self.head = ProjectionHead(cfg.feature_dim, dim, cfg.dropout)
        self.local_dim = dim

    def forward(self, regions_BRC: Tensor, mask_BR: Tensor | None = None) -> Features:
        if mask_BR is None:
            mask_BR = regions_BRC.new_ones(regions_BRC.shape[:2], dtype=torch.bool)
        local_BRD = self.head(regions_BRC, mask_BR)
        return Features(local_BRD, mask_BR, masked_max(local_BRD, mask_BR), pos=None)


class CNNGridEncoder(nn.Module):
    """torchvision ResNet/ResNeXt last conv map -> S*S projected cells + 2-D sine positions."""

    def __init__(
        self, cfg: ImageEncoderConfig, dim: int, arch: str, pretrained: bool = True
    ) -> None:
        super().__init__()
        import torchvision.models  # (here: importing it costs every process ~1.7 s, torch._dynamo)

        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained and cfg.weights is None:
            log.warning("model.image.weights is null: %s is randomly initialised", arch)
        elif pretrained:  # (not pretrained: architecture only, the caller loads a state dict)
            state = load_state_dict_file(cfg.weights, "model.image.weights")
            load_fitting(net, state, "model.image.weights", cfg.weights, arch, spare=["fc."])
        feat_dim = net.fc.in_features
        self.backbone = nn.Sequential(*list(net.children())[:-2])  # up to layer4, no pool/fc
        self.head = ProjectionHead(feat_dim, dim, cfg.dropout)
        self.local_dim = dim
        self.freeze_bn = cfg.freeze_bn
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    def train(self, mode: bool = True) -> CNNGridEncoder:
        super().train(mode)
        if self.freeze_bn:  # frozen BN keeps its ImageNet statistics in training too
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, images_B3HW: Tensor, mask_BR: Tensor | None = None) -> Features:
        del mask_BR  # every grid cell is real
        fmap_BCSS = self.backbone(images_B3HW)
        B, C, H, W = fmap_BCSS.shape
        cells_BRC = fmap_BCSS.flatten(2).transpose(1, 2)
        mask_BR = cells_BRC.new_ones(B, H * W, dtype=torch.bool)
        local_BRD = self.head(cells_BRC, mask_BR)
        pos_RD = sine_positions_2d(H, W, self.local_dim, device=local_BRD.device).to(
            local_BRD.dtype
        )
        return Features(local_BRD, mask_BR, local_BRD.mean(dim=1), pos=pos_RD)


class BiGRUEncoder(nn.Module):
    """Word vectors (GloVe-initialised, trainable) are the local features; a bi-GRU's final
    states, averaged over the two directions, are the global feature."""

    backbone = None

    def __init__(self, cfg: TextEncoderConfig, dim: int, pretrained: bool = True) -> None:
        super().__init__()
        # A vocabulary, or only its size (architecture-only models: `info`, exports).
        needed = cfg.vocab_path is not None or cfg.vocab_size is None
        vocab = config_vocab(cfg, "a bigru text tower") if needed else None
        num_words = len(vocab) if vocab is not None else int(cfg.vocab_size)  # type: ignore[arg-type]
        self.embed = nn.Embedding(num_words, cfg.word_dim, padding_idx=0)
        if cfg.glove_path is not None and pretrained:
            if not Path(cfg.glove_path).is_file():
                raise FileNotFoundError(
                    f"config key 'model.text.glove_path': not found: {cfg.glove_path}"
                )
            if vocab is None:
                raise UserError("'model.text.glove_path' needs 'model.text.vocab_path'")
            weights, _ = load_glove(cfg.glove_path, vocab, cfg.word_dim)
            self.embed.weight.data.copy_(weights)
        self.gru = nn.GRU(
            cfg.word_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True, bidirectional=True
        )
        self.to_global = nn.Identity() if cfg.hidden_dim == dim else nn.Linear(cfg.hidden_dim, dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.local_dim = cfg.word_dim

    def forward(self, ids_BR: Tensor, mask_BR: Tensor) -> Features:
        words_BRW = self.dropout(self.embed(ids_BR))
        lengths = mask_BR.sum(dim=1).cpu()
        packed = pack_padded_sequence(words_BRW, lengths, batch_first=True, enforce_sorted=False)
        _, h_n = self.gru(packed)  # (layers*2, B, hidden): packing makes it padding-independent
        pooled_BD = self.dropout(self.to_global((h_n[-2] + h_n[-1]) / 2))
        pos_RW = sine_positions_1d(ids_BR.shape[1], self.local_dim, device=ids_BR.device)
        return Features(words_BRW, mask_BR, pooled_BD, pos=pos_RW.to(words_BRW.dtype))


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder's token states -> Linear(hidden, D) local features; global =
    projected first token ([CLS] / <s>) or a max pool.

    Any architecture `transformers.AutoModel` builds from a local directory's config.json
    (BERT, MiniLM, RoBERTa, DistilBERT, ELECTRA, XLM-R, ...); its pooler, if it has one, is
    never built. Encoder-decoder and decoder-only models are refused (`check_text_encoder`).
    """

    def __init__(self, cfg: TextEncoderConfig, dim: int, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import BertConfig

        if cfg.bert_path is None:
            # Random init with the bert-base-uncased shape: for `setdiv info` and smoke runs.
            log.warning("model.text.bert_path is null: BERT is randomly initialised")
            self.backbone = _hf_encoder(BertConfig(), None)
        elif not Path(cfg.bert_path).is_dir():
            raise FileNotFoundError(
                f"config key 'model.text.bert_path': Hugging Face directory not found: "
                f"{cfg.bert_path}"
            )
        else:
            hf_cfg = hf_config(cfg.bert_path)
            check_text_encoder(hf_cfg, cfg.bert_path)
            # pretrained=False: the architecture only; the caller loads a full state dict.
            self.backbone = _hf_encoder(hf_cfg, cfg.bert_path if pretrained else None)
        if cfg.grad_checkpointing:
            enable = getattr(self.backbone, "activation_checkpointing_enable", None)
            (enable or self.backbone.gradient_checkpointing_enable)({"use_reentrant": False})
        self.proj = nn.Linear(self.backbone.config.hidden_size, dim)
        self.pool = cfg.bert_global
        self.local_dim = dim

    def forward(self, ids_BR: Tensor, mask_BR: Tensor) -> Features:
        states_BRH = self.backbone(
            input_ids=ids_BR, attention_mask=mask_BR.long()
        ).last_hidden_state
        local_BRD = self.proj(states_BRH)
        pooled_BD = local_BRD[:, 0] if self.pool == "cls" else masked_max(local_BRD, mask_BR)
        pos_RD = sine_positions_1d(ids_BR.shape[1], self.local_dim, device=ids_BR.device)
        return Features(local_BRD, mask_BR, pooled_BD, pos=pos_RD.to(local_BRD.dtype))


def _hf_encoder(hf_cfg: object, path: str | None) -> nn.Module:
    """The `AutoModel` class for `hf_cfg`, without a pooler where the class takes that flag;
    weights from `path` (local only), or randomly initialised when `path` is None."""
    import inspect

    from transformers import MODEL_MAPPING

    cls = MODEL_MAPPING[type(hf_cfg)]
    kw = {"add_pooling_layer": False}
    if "add_pooling_layer" not in inspect.signature(cls.__init__).parameters:
        kw = {}
    if path is None:
        return cls(hf_cfg, **kw)
    return hf_pretrained(cls, path, **kw)


def _resnet152(cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> CNNGridEncoder:
    return CNNGridEncoder(cfg, dim, "resnet152", pretrained)


def _resnext101(cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> CNNGridEncoder:
    return CNNGridEncoder(cfg, dim, "resnext101_32x8d", pretrained)


def _timm(cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> nn.Module:
    from setdiv.model.towers import TimmEncoder  # (timm is imported only when asked for)

    return TimmEncoder(cfg, dim, pretrained)


def _open_clip(cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> nn.Module:
    from setdiv.model.towers import OpenClipImageEncoder  # (open_clip imported when asked for)

    return OpenClipImageEncoder(cfg, dim, pretrained)


class ImageEncoder(NamedTuple):
    """A registered image encoder: how to build it, and what it reads from the shards."""

    build: Callable[..., nn.Module]
    reads: str
    """regions (precomputed features, `.npy`) | image (JPEG pixels)."""


IMAGE_ENCODERS: Registry[ImageEncoder] = Registry(
    "image encoder",
    {
        "region": ImageEncoder(RegionEncoder, "regions"),
        "resnet152": ImageEncoder(_resnet152, "image"),
        "resnext101_32x8d": ImageEncoder(_resnext101, "image"),
        "timm": ImageEncoder(_timm, "image"),
        "open_clip": ImageEncoder(_open_clip, "image"),
    },
)
"""The names `model.image.name` accepts."""


def image_input_kind(name: str) -> str:
    """What the image encoder registered as `name` reads from the shards: "regions" or
    "image"."""
    return IMAGE_ENCODERS[name].reads


def _open_clip_text(cfg: TextEncoderConfig, dim: int, pretrained: bool = True) -> nn.Module:
    from setdiv.model.towers import OpenClipTextEncoder

    return OpenClipTextEncoder(cfg, dim, pretrained)


TEXT_ENCODERS: Registry[Callable[..., nn.Module]] = Registry(
    "text encoder", {"bigru": BiGRUEncoder, "bert": HFTextEncoder, "open_clip": _open_clip_text}
)
"""The names `model.text.name` accepts."""


def build_image_encoder(cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> nn.Module:
    """The image encoder registered as `cfg.name`, producing D = dim global features.

    `pretrained=False` builds the architecture only (no weights file is read).
    """
    return IMAGE_ENCODERS[cfg.name].build(cfg, dim, pretrained)


def build_text_encoder(cfg: TextEncoderConfig, dim: int, pretrained: bool = True) -> nn.Module:
    """The text encoder registered as `cfg.name`, producing D = dim global features.

    `pretrained=False` skips GloVe / BERT weights (the vocabulary or BERT config is still read).
    """
    return TEXT_ENCODERS[cfg.name](cfg, dim, pretrained)
