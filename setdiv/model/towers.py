"""Pretrained image towers from other libraries, by registry name, from local files only.

`timm`: any timm architecture (`model.image.arch`, e.g. `vit_tiny_patch16_224`,
`convnext_atto`), built with `pretrained=False` and loaded from `model.image.weights` (a
.safetensors or weights-only torch file). The set module reads the patch tokens of a ViT (the
prefix tokens, CLS and registers, are left out; their position embeddings are already in the
tokens) or the cells of a convnet's last feature map (with 2-D sine positions).

`open_clip`: the vision tower of an open_clip model (`model.image.arch`, e.g. `ViT-B-16`, or a
config registered with `open_clip.add_model_config`), weights from a whole CLIP checkpoint
(its `visual.*` entries) or a vision-only state dict; the set module reads its patch tokens.

Preprocessing is the tower's own: `with_tower_preprocessing` fills the data config's null
normalisation, interpolation and crop keys from the architecture's pretrained config (what
`timm.data.resolve_data_config` gives), before readers are built and the run's config is
saved, so an export carries them and evaluation or search never needs the tower library.

Shape legend: B batch, R tokens / cells, C tower width, D embedding width, S grid side.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from setdiv.errors import UserError
from setdiv.model.layers import Features, ProjectionHead
from setdiv.model.positional import sine_positions_2d
from setdiv.model.weights import load_fitting, load_state_dict_file

if TYPE_CHECKING:
    from setdiv.config import Config, ImageEncoderConfig, TextEncoderConfig

__all__ = [
    "TOWERS",
    "OpenClipImageEncoder",
    "OpenClipTextEncoder",
    "TimmEncoder",
    "tower_preprocessing",
    "with_tower_preprocessing",
]

log = logging.getLogger(__name__)

TOWERS = ("timm", "open_clip")
"""Image encoder names whose preprocessing comes from the tower's own config."""


def _timm_arch(cfg: ImageEncoderConfig) -> str:
    import timm

    if not cfg.arch:
        raise UserError("config key 'model.image.arch': a timm architecture name is required")
    if not timm.is_model(cfg.arch):
        raise UserError(f"config key 'model.image.arch': {cfg.arch!r} is not a timm model")
    return cfg.arch


def _open_clip_config(cfg: ImageEncoderConfig | TextEncoderConfig) -> dict[str, Any]:
    import open_clip

    found = open_clip.get_model_config(cfg.arch) if cfg.arch else None
    if found is None:
        side = "image" if hasattr(cfg, "feature_dim") else "text"
        raise UserError(
            f"config key 'model.{side}.arch': {cfg.arch!r} is not an open_clip model config"
        )
    return found


def tower_preprocessing(cfg: ImageEncoderConfig) -> dict[str, Any] | None:
    """The tower's own input pipeline as data config values (image_size, image_mean,
    image_std, interpolation, crop_pct); None for encoders that are not towers."""
    if cfg.name == "open_clip":
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        model_cfg = _open_clip_config(cfg)
        pre = model_cfg.get("preprocess_cfg") or {}
        size = model_cfg["vision_cfg"].get("image_size", 224)
        return {
            "image_size": int(size if isinstance(size, int) else size[-1]),
            "image_mean": tuple(float(x) for x in pre.get("mean", OPENAI_DATASET_MEAN)),
            "image_std": tuple(float(x) for x in pre.get("std", OPENAI_DATASET_STD)),
            "interpolation": pre.get("interpolation", "bicubic"),
            "crop_pct": 1.0,  # open_clip: Resize(shortest side) + CenterCrop, no margin
        }
    if cfg.name != "timm":
        return None
    import timm

    pcfg = timm.get_pretrained_cfg(_timm_arch(cfg))
    if pcfg is None:  # an architecture without a pretrained config: build it to ask
        model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
        data = timm.data.resolve_data_config({}, model=model)
    else:
        data = timm.data.resolve_data_config(pcfg.to_dict())
    interpolation = data.get("interpolation", "bicubic")
    return {
        "image_size": int(data["input_size"][-1]),
        "image_mean": tuple(float(x) for x in data["mean"]),
        "image_std": tuple(float(x) for x in data["std"]),
        "interpolation": interpolation if interpolation in ("bilinear", "bicubic") else "bicubic",
        "crop_pct": float(data.get("crop_pct", 0.875)),
    }


def with_tower_preprocessing(cfg: Config) -> Config:
    """`cfg` with the data config's null preprocessing keys taken from the image tower (set
    keys are kept); a tower that needs a fixed input size other than `data.image_size` is an
    error naming both. Unchanged for the torchvision CNNs and region features."""
    tower = tower_preprocessing(cfg.model.image)
    if tower is None:
        return cfg
    data = cfg.data
    fills = {k: v for k, v in tower.items() if k != "image_size" and getattr(data, k) is None}
    fixed = cfg.model.image.name == "open_clip" or "vit" in (cfg.model.image.arch or "")
    if data.image_size != tower["image_size"] and fixed:
        raise UserError(
            f"config key 'data.image_size' is {data.image_size}, but {cfg.model.image.arch} "
            f"takes {tower['image_size']}-pixel images: set data.image_size={tower['image_size']}"
        )
    if not fills:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(data, **fills))


class TimmEncoder(nn.Module):
    """A timm model's token grid (ViT patch tokens, or a convnet's last feature map) ->
    projected local features; global = their mean."""

    def __init__(self, cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> None:
        super().__init__()
        import timm

        arch = _timm_arch(cfg)
        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        if pretrained and cfg.weights is None:
            log.warning("model.image.weights is null: %s is randomly initialised", arch)
        elif pretrained:
            state = load_state_dict_file(cfg.weights, "model.image.weights")
            heads = ["head.", "fc.", "head_"]  # (a classifier's: unused here)
            load_fitting(self.backbone, state, "model.image.weights", cfg.weights, arch, heads)
        self.unused = self._freeze_unused(arch)
        if cfg.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        self.prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.grid = not hasattr(self.backbone, "num_prefix_tokens")
        """A convnet (a feature map) rather than a ViT (tokens with their own positions)."""
        self.head = ProjectionHead(self.backbone.num_features, dim, cfg.dropout)
        self.local_dim = dim

    def _freeze_unused(self, arch: str) -> list[str]:
        """Parameters the token grid does not depend on (a classifier head's norm, say): one
        dry forward and backward finds them; they are frozen (no gradient, no optimizer
        state, no unused-parameter trouble in data-parallel training) and their names
        returned."""
        import timm

        pcfg = timm.get_pretrained_cfg(arch)
        size = int(pcfg.input_size[-1]) if pcfg is not None else 224
        self.backbone.zero_grad(set_to_none=True)
        with torch.enable_grad():
            self.backbone.forward_features(torch.zeros(1, 3, size, size)).float().sum().backward()
        unused = [n for n, p in self.backbone.named_parameters() if p.grad is None]
        self.backbone.zero_grad(set_to_none=True)
        for name, p in self.backbone.named_parameters():
            if name in unused:
                p.requires_grad_(False)
        if unused:
            log.info("%s: %d parameter(s) unused by the token grid, frozen: %s", arch,
                     len(unused), ", ".join(unused[:4]))  # fmt: skip
        return [f"backbone.{n}" for n in unused]

    def tokens(self, images_B3HW: Tensor) -> Tensor:
        """(B, R, C) the tower's token grid: ViT patch tokens (no prefix tokens), or a
        convnet's last feature map cells in row-major order. What `setdiv extract` caches."""
        out = self.backbone.forward_features(images_B3HW)
        if out.ndim == 4:
            return out.flatten(2).transpose(1, 2)
        return out[:, self.prefix :]

    def forward(self, images_B3HW: Tensor, mask_BR: Tensor | None = None) -> Features:
        """Images (B, 3, H, W), or cached tokens (B, R, C) with their mask (`data.features`:
        the tower is not run)."""
        if images_B3HW.ndim == 3:
            tokens_BRC = images_B3HW
        else:
            tokens_BRC, mask_BR = self.tokens(images_B3HW), None
        if mask_BR is None:
            mask_BR = tokens_BRC.new_ones(tokens_BRC.shape[:2], dtype=torch.bool)
        pos_RD = None
        if self.grid:  # convnet cells (a square map): 2-D positions
            side = math.isqrt(tokens_BRC.shape[1])
            pos_RD = sine_positions_2d(side, side, self.local_dim, device=tokens_BRC.device)
        local_BRD = self.head(tokens_BRC, mask_BR)
        if pos_RD is not None:
            pos_RD = pos_RD.to(local_BRD.dtype)
        return Features(local_BRD, mask_BR, local_BRD.mean(dim=1), pos=pos_RD)


class OpenClipImageEncoder(nn.Module):
    """An open_clip vision tower's patch tokens -> projected local features; global = the
    projection of the tower's own pooled output."""

    def __init__(self, cfg: ImageEncoderConfig, dim: int, pretrained: bool = True) -> None:
        super().__init__()
        import open_clip

        _open_clip_config(cfg)
        clip = open_clip.create_model(cfg.arch, pretrained=None, load_weights=False)
        self.backbone = clip.visual
        del clip  # (the text half is not needed here)
        if pretrained and cfg.weights is None:
            log.warning("model.image.weights is null: %s is randomly initialised", cfg.arch)
        elif pretrained:
            state = load_state_dict_file(cfg.weights, "model.image.weights")
            if any(k.startswith("visual.") for k in state):
                state = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}
            load_fitting(self.backbone, state, "model.image.weights", cfg.weights, cfg.arch)
        if not hasattr(self.backbone, "output_tokens"):
            raise UserError(
                f"config key 'model.image.arch': {cfg.arch}'s vision tower gives no tokens"
            )
        self.backbone.output_tokens = True
        if cfg.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        width = self.backbone.transformer.width
        self.head = ProjectionHead(width, dim, cfg.dropout)
        self.pooled = nn.Linear(self.backbone.output_dim, dim)
        self.local_dim = dim

    def forward(self, images_B3HW: Tensor, mask_BR: Tensor | None = None) -> Features:
        del mask_BR  # every token is real
        pooled_BE, tokens_BRC = self.backbone(images_B3HW)
        mask_BR = tokens_BRC.new_ones(tokens_BRC.shape[:2], dtype=torch.bool)
        local_BRD = self.head(tokens_BRC, mask_BR)
        return Features(local_BRD, mask_BR, self.pooled(pooled_BE), pos=None)


class OpenClipTextEncoder(nn.Module):
    """An open_clip text tower's token states (after its final LayerNorm) -> projected local
    features; global = the projected state at the end-of-text token (CLIP's own pooling).
    The tower is causal, so padding after the end of a caption changes none of its states."""

    def __init__(self, cfg: TextEncoderConfig, dim: int, pretrained: bool = True) -> None:
        super().__init__()
        import open_clip

        model_cfg = _open_clip_config(cfg)
        if "hf_model_name" in model_cfg.get("text_cfg", {}):
            raise UserError(
                f"config key 'model.text.arch': {cfg.arch}'s text tower is a Hugging Face "
                "model: use model.text.name=bert with its local directory"
            )
        clip = open_clip.create_model(cfg.arch, pretrained=None, load_weights=False)
        self.backbone = nn.Module()
        for name in ("token_embedding", "transformer", "ln_final"):
            setattr(self.backbone, name, getattr(clip, name))
        self.backbone.positional_embedding = clip.positional_embedding
        self.backbone.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        del clip
        if pretrained and cfg.weights is None:
            log.warning("model.text.weights is null: %s's text tower is random", cfg.arch)
        elif pretrained:
            state = load_state_dict_file(cfg.weights, "model.text.weights")
            mine = self.backbone.state_dict()
            state = {k: v for k, v in state.items() if k in mine}
            missing = sorted(set(mine) - set(state))
            if missing:
                raise UserError(
                    f"config key 'model.text.weights': {cfg.weights} does not fit {cfg.arch}'s "
                    f"text tower: missing {missing[:5]}"
                )
            load_fitting(self.backbone, state, "model.text.weights", cfg.weights, cfg.arch)
        self.backbone.transformer.grad_checkpointing = cfg.grad_checkpointing
        width = self.backbone.transformer.width
        self.proj = nn.Linear(width, dim)
        self.local_dim = dim

    def states(self, ids_BR: Tensor) -> Tensor:
        """(B, R, W) the tower's token states after its final LayerNorm."""
        tower, R = self.backbone, ids_BR.shape[1]
        x_BRW = tower.token_embedding(ids_BR) + tower.positional_embedding[:R]
        return tower.ln_final(tower.transformer(x_BRW, attn_mask=tower.attn_mask[:R, :R]))

    def forward(self, ids_BR: Tensor, mask_BR: Tensor) -> Features:
        local_BRD = self.proj(self.states(ids_BR))
        eot_B = (ids_BR * mask_BR).argmax(dim=1)  # the end-of-text id is the largest
        pooled_BD = local_BRD[torch.arange(ids_BR.shape[0]), eot_B]
        return Features(local_BRD, mask_BR, pooled_BD, pos=None)
