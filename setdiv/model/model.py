"""The set-based retrieval model: an encoder and a set prediction module per modality.

Shape legend: B batch, R inputs, K / L set sizes, D embedding width.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor, nn

from setdiv.model.encoders import build_image_encoder, build_text_encoder
from setdiv.model.set_modules import SetOutput, build_set_module

if TYPE_CHECKING:  # setdiv.config imports this package for its registries' names
    from setdiv.config import ModelConfig

__all__ = ["SetRetrievalModel", "build_model"]


class SetRetrievalModel(nn.Module):
    """Images -> (B,K,D) and captions -> (B,L,D) sets of unit embeddings."""

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        image_set: nn.Module,
        text_set: nn.Module,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_set = image_set
        self.text_set = text_set

    def encode_image(self, images: Tensor, mask_BR: Tensor | None = None) -> SetOutput:
        """Regions (B,R,Cin) with optional mask (B,R), or pixels (B,3,H,W) -> (B,K,D) set."""
        f = self.image_encoder(images, mask_BR)
        return self.image_set(f.local, f.mask, f.pooled, f.pos)

    def encode_text(self, ids_BR: Tensor, mask_BR: Tensor) -> SetOutput:
        """Token ids (B,R) with validity mask (B,R) -> (B,L,D) set."""
        f = self.text_encoder(ids_BR, mask_BR)
        return self.text_set(f.local, f.mask, f.pooled, f.pos)

    def forward(
        self, images: Tensor, image_mask: Tensor | None, ids: Tensor, text_mask: Tensor
    ) -> tuple[SetOutput, SetOutput]:
        return self.encode_image(images, image_mask), self.encode_text(ids, text_mask)


def build_model(cfg: ModelConfig, pretrained: bool = True) -> SetRetrievalModel:
    """Build both encoders and both set modules from the model config subtree.

    `pretrained=False` builds the architecture without reading backbone / GloVe weights, for
    loading a complete state dict afterwards (exported models, checkpoints).
    """
    image_encoder = build_image_encoder(cfg.image, cfg.embed_dim, pretrained)
    text_encoder = build_text_encoder(cfg.text, cfg.embed_dim, pretrained)
    text_set = cfg.text_set
    if text_set.name == "pienet" and cfg.text.name == "bert" and text_set.pie_hidden is None:
        text_set = replace(text_set, pie_hidden=cfg.text.word_dim // 2)  # official: 300 // 2
    return SetRetrievalModel(
        image_encoder,
        text_encoder,
        build_set_module(cfg.image_set, image_encoder.local_dim, cfg.embed_dim),
        build_set_module(text_set, text_encoder.local_dim, cfg.embed_dim),
    )
