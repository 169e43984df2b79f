"""`setdiv eval --analysis`: circular variance, per-element RSUM (paper Table 5), and slot
attention maps over a few test images.

Shape legend: N images, M captions, K / L set sizes, T iterations, H heads, R inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from setdiv.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from setdiv.data.samples import Batch  # noqa: E402
from setdiv.distributed import all_gather_rows, is_rank_zero  # noqa: E402
from setdiv.eval.evaluator import Encoded  # noqa: E402
from setdiv.eval.metrics import recall_at_k  # noqa: E402
from setdiv.eval.set_statistics import circular_variance, slot_specialisation  # noqa: E402
from setdiv.model import SetRetrievalModel  # noqa: E402

__all__ = ["analyse", "attention_figure", "element_rsums", "specialisation_figure"]


def element_rsums(
    similarity: Callable[[Tensor, Tensor], Tensor], images: Tensor, captions: Tensor
) -> dict[str, float]:
    """RSUM when only element k of the image sets (img_k) or of the caption sets (txt_k) is
    kept, the other side's full sets unchanged."""
    out = {}
    with torch.no_grad():
        for k in range(images.shape[1]):
            out[f"rsum_img_elem{k}"] = recall_at_k(
                similarity(images[:, k : k + 1], captions).cpu()
            )["rsum"]
        for k in range(captions.shape[1]):
            out[f"rsum_txt_elem{k}"] = recall_at_k(
                similarity(images, captions[:, k : k + 1]).cpu()
            )["rsum"]
    return out


def _attention_maps(
    model: SetRetrievalModel, batch: Batch, n: int, device: torch.device
) -> list[Tensor]:
    """Per image, (T, K, R) slot attention averaged over heads."""
    mask = batch.image_mask[:n].to(device) if batch.image_mask is not None else None
    with torch.no_grad():
        out = model.encode_image(batch.images[:n].to(device), mask)
    stacked = torch.stack([a.mean(dim=1) for a in out.attn], dim=1)  # (n, T, K, R)
    return [stacked[i].float().cpu() for i in range(stacked.shape[0])]


def attention_figure(
    model: SetRetrievalModel, batch: Batch, device: torch.device, n: int = 3
) -> Any:
    """A grid per image: one row per iteration, one column per slot. Grid models show the
    map over the picture; region models a bar per region."""
    maps = _attention_maps(model, batch, n, device)
    T, K, R = maps[0].shape
    is_grid = batch.images.dim() == 4
    first = 1 if is_grid else 0  # grid models get a column with the picture itself
    fig, axes = plt.subplots(
        len(maps) * T, K + first, figsize=(1.8 * (K + first), 1.6 * len(maps) * T), squeeze=False
    )
    for i, attn_TKR in enumerate(maps):
        picture = None
        if is_grid:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            picture = (batch.images[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        for t in range(T):
            row = axes[i * T + t]
            if is_grid:
                row[0].set_axis_off()
                row[0].imshow(picture)
            row[0].set_ylabel(f"{batch.image_ids[i]}\nit {t + 1}", fontsize=7)
            for k in range(K):
                ax = row[k + first]
                a = attn_TKR[t, k].numpy()
                if is_grid:
                    side = int(round(np.sqrt(R)))
                    ax.imshow(picture)
                    h, w = picture.shape[:2]
                    ax.imshow(a.reshape(side, side), cmap="jet", alpha=0.5, extent=(0, w, h, 0))
                    ax.set_axis_off()
                else:
                    valid = (
                        batch.image_mask[i].numpy()
                        if batch.image_mask is not None
                        else np.ones(R, bool)
                    )
                    ax.bar(np.arange(int(valid.sum())), a[valid], color=f"C{k}")
                    ax.axhline(1 / int(valid.sum()), color="grey", lw=0.6, ls="--")  # uniform
                    ax.set_ylim(0, float(attn_TKR.max()) * 1.1)
                    ax.tick_params(labelsize=5)
                if i == 0 and t == 0:
                    ax.set_title(f"slot {k + 1}", fontsize=8)
    fig.suptitle("slot attention per iteration (rows) and slot (columns)", fontsize=9)
    fig.tight_layout()
    return fig


def analyse(
    model: SetRetrievalModel,
    reader: Iterable[Batch],
    enc: Encoded,
    similarity: Callable[[Tensor, Tensor], Tensor],
    device: torch.device,
) -> tuple[dict[str, float], dict[str, Any]] | None:
    """Rank 0 (or a lone process) gets (numbers, {"attention": figure}); other ranks None."""
    images, captions = all_gather_rows(enc.images), all_gather_rows(enc.captions)
    if not is_rank_zero():
        return None
    numbers = {
        "circular_variance_image": float(circular_variance(images).mean()),
        "circular_variance_text": float(circular_variance(captions).mean()),
        **element_rsums(similarity, images, captions),
    }
    first = next(iter(reader))
    maps = _attention_maps(model, first, first.images.shape[0], device)  # last iteration:
    peaks_K, uniform = slot_specialisation(torch.stack([m[-1] for m in maps]), first.image_mask)
    numbers["slot_max_attention_uniform"] = uniform
    for k, v in enumerate(peaks_K.tolist()):
        numbers[f"slot_max_attention_{k}"] = v
    figures = {
        "attention": attention_figure(model, first, device),
        "specialisation": specialisation_figure(peaks_K.tolist(), uniform, len(maps)),
    }
    return numbers, figures


def specialisation_figure(peaks: list[float], uniform: float, num_images: int) -> Any:
    """A bar per slot: its mean largest attention weight, against uniform attention."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(peaks), 2.8))
    ax.bar(
        [f"slot {k + 1}" for k in range(len(peaks))],
        peaks,
        color=[f"C{k}" for k in range(len(peaks))],
    )
    ax.axhline(uniform, color="grey", ls="--", lw=1, label=f"uniform 1/R = {uniform:.3f}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean max attention")
    ax.set_title(f"slot specialisation ({num_images} test images, last iteration)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
