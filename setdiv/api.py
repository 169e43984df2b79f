"""The Python API for trained models: `setdiv.load(path)` and what it returns.

    import setdiv
    model = setdiv.load("runs/demo/k4/export")        # an export, a run dir or its weights
    images = model.encode_images(["a.jpg", "b.jpg"])  # (2, K, D) sets of unit vectors
    texts = model.encode_texts(["a dog on a skateboard", "two cats"])  # (2, L, D)
    scores = model.similarity(images, texts)           # (2, 2), the model's own similarity

Shape legend: N images, M captions, K / L set sizes, D width, R regions, C region width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from setdiv.data.images import image_transform, normalise
from setdiv.data.samples import Batch, sample_options
from setdiv.data.text import Tokenizer
from setdiv.errors import UserError
from setdiv.eval.evaluator import Encoded, encode
from setdiv.export import ExportedModel, load_exported
from setdiv.model.encoders import image_input_kind
from setdiv.similarity import build_similarity

__all__ = ["SetModel", "load"]

ImageInput = str | Path | Image.Image | Tensor | np.ndarray


def load(path: str | Path, device: str | torch.device = "cpu") -> SetModel:
    """The model of an export directory, a run directory (its `export/`) or an exported
    `model.safetensors`, in eval mode on `device`."""
    return SetModel(load_exported(path), torch.device(device))


class SetModel:
    """An exported model with its preprocessing, tokenizer and similarity."""

    def __init__(self, exported: ExportedModel, device: torch.device) -> None:
        self.exported, self.device = exported, device
        self.model = exported.model.to(device).eval()
        self.cfg = exported.cfg
        self.tokenizer: Tokenizer = exported.tokenizer
        self.input_kind = image_input_kind(self.cfg.model.image.name)
        """image (pixels) | regions (feature arrays, (R, C) each)."""
        self._opts = sample_options(self.cfg.data, "image", self.tokenizer, False, augment=False)
        self._transform = image_transform(self._opts, False) if self.input_kind == "image" else None
        self._similarity = build_similarity(self.cfg.similarity)

    @property
    def preprocess(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> (3, S, S) normalised pixels, as evaluation reads a test image."""
        self._check_pixels()

        def pixels(im: Image.Image) -> Tensor:
            im.load()  # a caller's image decodes whole: never drafted (images.py) in place
            return self._pixels(im)

        return pixels

    def _check_pixels(self) -> None:
        if self._transform is None:
            raise UserError(
                f"this model reads region features ({self.cfg.model.image.name}), not images"
            )

    def _pixels(self, im: Image.Image) -> Tensor:
        x = torch.from_numpy(self._transform(im))[None]  # type: ignore[misc]
        return normalise(x, self._opts.mean, self._opts.std)[0]

    def _image_tensor(self, item: ImageInput) -> Tensor:
        if isinstance(item, (str, Path)):
            self._check_pixels()
            try:
                with Image.open(item) as im:
                    return self._pixels(im)  # (opened here: may decode at a DCT scale)
            except OSError as exc:
                raise UserError(f"{item}: not a readable image ({exc})") from None
        if isinstance(item, Image.Image):
            return self.preprocess(item)
        return torch.as_tensor(item)

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False
    ) -> Tensor:
        """(N, K, D) sets of `images`: file paths or PIL images (pixel models), tensors already
        preprocessed ((3, S, S) each), or region features ((R, C) arrays, R may vary)."""
        out = []
        dtype = next(self.model.parameters()).dtype  # (bf16 / fp16 models take their dtype)
        starts = range(0, len(images), batch_size)
        for i in tqdm(starts, desc="images", unit="batch", disable=not progress):
            items = [self._image_tensor(x).float() for x in images[i : i + batch_size]]
            if self.input_kind == "regions":
                x = pad_sequence(items, batch_first=True)
                mask = torch.arange(x.shape[1]) < torch.tensor([[len(t)] for t in items])
                sets = self.model.encode_image(x.to(self.device, dtype), mask.to(self.device))
            else:
                sets = self.model.encode_image(torch.stack(items).to(self.device, dtype))
            out.append(sets.embeds.float())
        return torch.cat(out) if out else torch.zeros(0, 1, 1, device=self.device)

    @torch.no_grad()
    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> Tensor:
        """(M, L, D) sets of `texts` (tokenised and truncated as training did)."""
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise UserError("encode_texts takes non-empty strings")
        out = []
        pad = self.tokenizer.pad_id
        starts = range(0, len(texts), batch_size)
        for i in tqdm(starts, desc="texts", unit="batch", disable=not progress):
            ids = [torch.tensor(self.tokenizer.encode(t)) for t in texts[i : i + batch_size]]
            tokens = pad_sequence(ids, batch_first=True, padding_value=pad)
            mask = torch.arange(tokens.shape[1]) < torch.tensor([[len(t)] for t in ids])
            sets = self.model.encode_text(tokens.to(self.device), mask.to(self.device))
            out.append(sets.embeds.float())
        return torch.cat(out) if out else torch.zeros(0, 1, 1, device=self.device)

    def encode_batches(
        self, batches: Iterable[Batch], modality: str = "both", progress: bool = False
    ) -> Encoded:
        """Every image and caption of reader `batches` (a shard reader's, already
        preprocessed and tokenised) encoded once: the evaluator's `encode` on this model and
        device; `modality` "image" / "text" encodes that side only."""
        return encode(self.model, batches, self.device, progress=progress, modality=modality)

    @torch.no_grad()
    def similarity(self, images_NKD: Tensor, texts_MLD: Tensor) -> Tensor:
        """(N, M) set similarities (the model's own: smooth-Chamfer with its alpha, ...)."""
        return self._similarity(images_NKD, texts_MLD)

    def __repr__(self) -> str:
        m = self.cfg.model
        return (
            f"SetModel(image={m.image.name}, text={m.text.name}, K={m.image_set.num_embeds}, "
            f"L={m.text_set.num_embeds}, D={m.embed_dim}, similarity={self.cfg.similarity.name})"
        )
