"""Image transforms: the official DivE pipelines, and JPEG decoding at the size they need.

A 640 x 480 photo for a 224 px model is decoded whole and then shrunk; libjpeg-turbo can instead
decode straight to 1/2, 1/4 or 1/8 of the size by scaling in the DCT domain, and decode only
the region a transform keeps: it skips the IDCT and colour conversion of the columns beside
the region and of the rows above it, and stops after its last row. `fast_decode` picks the
smallest scale that still covers what the transform cuts out, so the resize that follows only
ever shrinks (or, where the region lands on exactly `size` pixels, is a plain crop):

- test, crop:   the centre crop Resize + CenterCrop keep must stay >= size (the shorter side
                >= size / crop_pct);
- test, gpo512: both sides >= size (Resize((size, size)));
- train:        the crop RandomResizedCrop samples on the full image (same draws, same
                region) must stay >= size on both sides once scaled.

The region is resized to (size, size) in one step over a sub-pixel box, mirrored for the
training flip, and written in the model's (3, size, size) layout, all in `_jpeg.c` (compiled at
install; `decoder()` says whether it is). Without it, JPEGs take Pillow's `Image.draft` (the
same scales, the whole image decoded) and Pillow's resize. Files libjpeg-turbo declines or
warns about (CMYK, corrupt or truncated data), non-JPEG files and images already decoded (the
Python API's PIL inputs) are decoded by Pillow, which decides what is skipped, as before, and
resized by `_jpeg.c` (so an image gives the same pixels by either route at the same scale).

`image_decode="device"` (training) goes further: a data worker only reads the JPEG's header,
draws the crop and the flip, and passes the bytes on (`Encoded`); the batch (`DeviceImages`)
decodes where it is moved, with nvJPEG on a GPU (`torchvision.io.decode_jpeg(device=...)`),
then crops, resizes and normalises there. Files the device decoder does not take (PNG, CMYK)
are decoded by the worker as above. docs/data.md gives the measured speed and pixel difference.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

try:
    from setdiv.data import _jpeg
except ImportError:  # not built: no compiler or libjpeg-turbo headers at install (pyproject)
    _jpeg = None

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DeviceImages",
    "Encoded",
    "ImageOptions",
    "image_transform",
    "image_transform_steps",
    "normalise",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform_steps(
    size: int,
    train: bool,
    style: str = "crop",
    hflip: bool = True,
    interpolation: str = "bilinear",
    crop_pct: float = 0.875,
) -> list[Callable]:
    """The torchvision v2 steps of the official DivE image pipeline (before normalisation).

    crop:   train RandomResizedCrop(size) (default scale 0.08-1), test Resize(size / crop_pct)
            + CenterCrop(size) (224 -> 256 -> 224 at the official 0.875).
    gpo512: train RandomResizedCrop(size, scale=(0.36, 1)), test Resize((size, size)) (the
            official `gpo_aug` 512-pixel setting).
    Training adds a horizontal flip when `hflip` (official, though captions say left/right).
    """
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode(interpolation)
    if train:
        scale = (0.36, 1.0) if style == "gpo512" else (0.08, 1.0)
        steps = [v2.RandomResizedCrop(size, scale=scale, interpolation=mode, antialias=True)]
        return steps + ([v2.RandomHorizontalFlip()] if hflip else [])
    if style == "gpo512":
        return [v2.Resize((size, size), interpolation=mode, antialias=True)]
    resize = v2.Resize(int(size / crop_pct), interpolation=mode, antialias=True)
    return [resize, v2.CenterCrop(size)]


class ImageOptions(Protocol):
    """What a transform reads of the data options (`samples.SampleOptions` has them)."""

    image_size: int
    image_transform: str
    train_transform: str
    hflip: bool
    interpolation: str
    crop_pct: float
    fast_decode: bool
    image_decode: str


def _draft(im: Image.Image, need_w: float, need_h: float) -> int:
    """Let a not yet decoded JPEG decode at the smallest DCT scale 1/s (s in 1, 2, 4, 8) whose
    width stays >= need_w and height >= need_h; returns s. Other formats and images already
    decoded: a no-op, s = 1."""
    # Pillow takes the largest s <= min(w // rw, h // rh): w // ceil(need_w) <= w / need_w.
    full_w = im.size[0]
    drafted = im.draft(im.mode, (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))
    return 1 if drafted is None else round(full_w / drafted[1][2])


def _test_box(w: int, h: int, size: int, style: str, crop_pct: float) -> tuple[float, ...]:
    """The region of a (w, h) image that the test transform maps onto its output, in the
    image's own pixels: Resize + CenterCrop's geometry (torchvision's rounding) run backwards."""
    if style == "gpo512":
        return (0.0, 0.0, float(w), float(h))
    short = int(size / crop_pct)
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    fx, fy = w / new_w, h / new_h
    return (left * fx, top * fy, (left + size) * fx, (top + size) * fy)


def _cut(
    im: Image.Image, box: tuple[float, ...], size: int, resample: int, flip: bool = False
) -> np.ndarray:
    """(3,size,size) uint8: decode `im` with Pillow at the smallest DCT scale that keeps `box`
    >= size on both sides, then resize the box (in full-size pixels) to (size, size) in one
    step, mirrored when `flip`: with the region decoder's resize where it is built (the same
    pixels as the region decoder wherever the decoded pixels are the same), else Pillow's."""
    left, top, right, bottom = box
    full_w, full_h = im.size
    s = _draft(im, size * full_w / (right - left), size * full_h / (bottom - top))
    if im.mode != "RGB":
        im = im.convert("RGB")
    scaled = (left / s, top / s, min(right / s, im.width), min(bottom / s, im.height))
    if _jpeg is not None:
        bicubic = resample == Image.Resampling.BICUBIC
        rgbx = im.tobytes("raw", "RGBX")
        out = _jpeg.resize(rgbx, im.width, im.height, scaled, size, bicubic, flip)
        return np.frombuffer(out, np.uint8).reshape(3, size, size)
    out = np.asarray(im.resize((size, size), resample, box=scaled))
    return np.ascontiguousarray((out[:, ::-1] if flip else out).transpose(2, 0, 1))


SCALES = (1, 2, 4, 8)
"""The DCT scales the region decoder picks from, in eighths (1/8, 1/4, 1/2, whole): the ones
Pillow's fallback has too, so both paths decode a file at the same size. (libjpeg-turbo also
offers 3/8, 5/8, 6/8 and 7/8; measured on the CC12M photos they were no faster and further from
the exact pipeline: BENCHMARKS.md.)"""


def decoder() -> str:
    """Which decoder `fast_decode` uses: "libjpeg-turbo regions" or "Pillow draft"."""
    return "Pillow draft" if _jpeg is None else "libjpeg-turbo regions"


def jpeg_bytes(im: Image.Image, data: bytes | None) -> bytes | None:
    """The bytes of a JPEG the region decoder can take (RGB or grayscale), else None: `data`
    when given, else read back from the file Pillow opened it from."""
    if _jpeg is None or im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    if data is None and getattr(im, "fp", None) is not None:
        pos = im.fp.tell()
        im.fp.seek(0)
        data = im.fp.read()
        im.fp.seek(pos)
    return data


def _decode_box(
    data: bytes,
    full: tuple[int, int],
    box: tuple[float, ...],
    size: int,
    resample: int,
    flip: bool = False,
) -> np.ndarray | None:
    """(3,size,size) uint8: the `box` (left, top, right, bottom, full-size pixels) of a JPEG
    decoded at the smallest of `SCALES` keeping it >= size on both sides, resized to size and
    mirrored when `flip`; None when libjpeg-turbo declines or warns (the caller then decodes
    with Pillow)."""
    left, top, right, bottom = box
    num = next((m for m in SCALES if min(right - left, bottom - top) * m / 8 >= size), 8)
    k = num / 8
    w, h = math.ceil(full[0] * k), math.ceil(full[1] * k)
    scaled = (left * k, top * k, min(right * k, w), min(bottom * k, h))
    bicubic = resample == Image.Resampling.BICUBIC
    # The resize reads up to its filter's support (widened when shrinking) beyond the box; the
    # region goes 2 px further, since libjpeg replicates the edge pixels of a horizontal crop
    # in its chroma upsampling (its outermost columns differ from a whole decode by a level).
    shrink = max(1.0, (scaled[2] - scaled[0]) / size, (scaled[3] - scaled[1]) / size)
    reach = math.ceil((2.0 if bicubic else 1.0) * shrink) + 2
    x0, y0 = max(0, math.floor(scaled[0]) - reach), max(0, math.floor(scaled[1]) - reach)
    x1, y1 = min(w, math.ceil(scaled[2]) + reach), min(h, math.ceil(scaled[3]) + reach)
    tail = y1 < h and not data.endswith(b"\xff\xd9")  # (a truncated file must still fail)
    try:
        out = _jpeg.decode(data, num, x0, y0, x1, y1, tail, scaled, size, bicubic, flip)
    except ValueError:
        return None
    return np.frombuffer(out, np.uint8).reshape(3, size, size)


def image_transform(opts: ImageOptions, train: bool) -> Callable[..., np.ndarray | Encoded]:
    """f(PIL image (opened, preferably not yet decoded)) -> (3,size,size) uint8 RGB.

    Normalisation happens batched in `collate`. With `opts.fast_decode` a JPEG decodes at
    the smallest DCT scale that covers the transform's output; with `opts.image_decode ==
    "device"` (training), f(image, its file's bytes) leaves a JPEG encoded (module docstring).
    """
    from torchvision.transforms import v2

    train = train and opts.train_transform == "random"
    steps = image_transform_steps(
        opts.image_size, train, opts.image_transform, opts.hflip, opts.interpolation, opts.crop_pct
    )
    if not opts.fast_decode and opts.image_decode != "device":
        pipeline = v2.Compose([v2.ToImage(), *steps])
        return lambda im, data=None: pipeline(im.convert("RGB")).numpy()
    size, style = opts.image_size, opts.image_transform
    resample = Image.Resampling.BICUBIC if opts.interpolation == "bicubic" else Image.BILINEAR
    if _jpeg is None:
        _warn_once_without_decoder()

    def cut(im: Image.Image, data: bytes | None, box: tuple[float, ...], flip: bool):  # noqa: ANN202
        if data is not None and opts.image_decode == "device" and _device_decodes(im):
            return Encoded(np.frombuffer(data, np.uint8), box, flip)
        jpg = jpeg_bytes(im, data)
        out = None if jpg is None else _decode_box(jpg, im.size, box, size, resample, flip)
        return out if out is not None else _cut(im, box, size, resample, flip)

    if not train:
        return lambda im, data=None: cut(
            im, data, _test_box(*im.size, size, style, opts.crop_pct), False
        )
    crop, flip = steps[0], steps[1:]

    def train_(im: Image.Image, data: bytes | None = None) -> np.ndarray | Encoded:
        p = crop.make_params([im])  # the draws the exact path makes, on the full size
        box = (p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"])
        flipped = bool(flip) and bool(torch.rand(1) < flip[0].p)  # (RandomHorizontalFlip's draw)
        return cut(im, data, box, flipped)

    return train_


@functools.cache
def _warn_once_without_decoder() -> None:
    warnings.warn(
        "setdiv.data._jpeg is not built (no C compiler or libjpeg-turbo headers when setdiv was "
        "installed): JPEGs decode through Pillow's draft mode, about 1.6x slower on CC12M-sized "
        "photos. Install libjpeg-turbo's headers (Debian: libjpeg62-turbo-dev; RHEL: "
        "libjpeg-turbo-devel) and reinstall setdiv (docs/data.md, 'Decoding images').",
        stacklevel=3,
    )


def _device_decodes(im: Image.Image) -> bool:
    """Whether torchvision's JPEG decoders (nvJPEG, libjpeg) take this file: baseline or
    progressive JPEG in RGB / grayscale (CMYK ones are decoded by the worker)."""
    return im.format == "JPEG" and im.mode in ("RGB", "L")


@dataclass
class Encoded:
    """A training image left JPEG-encoded: its bytes, the region of the full-size image the
    transform cuts out (left, top, right, bottom) and whether it is flipped."""

    data: np.ndarray
    box: tuple[float, ...]
    flip: bool


class DeviceImages:
    """A batch of B images that decode where they are moved: `.to(device, dtype)` ->
    (B,3,size,size) normalised, like a tensor of pixels (`shape` too). Items are `Encoded`
    JPEGs or (3,size,size) uint8 arrays a worker decoded already."""

    def __init__(
        self,
        items: Sequence[Encoded | np.ndarray],
        size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        interpolation: str = "bilinear",
    ) -> None:
        self.items, self.size, self.mean, self.std = list(items), size, mean, std
        self.interpolation = interpolation

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.items), 3, self.size, self.size))

    def pixels(self, device: torch.device | str) -> Tensor:
        """(B,3,size,size) uint8 on `device`: nvJPEG on CUDA, libjpeg on the CPU."""
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(device)
        jobs = [(i, x) for i, x in enumerate(self.items) if isinstance(x, Encoded)]
        data = [torch.from_numpy(x.data.copy()) for _, x in jobs]
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec (docs/data.md)
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device) if data else []
        out = torch.empty(self.shape, dtype=torch.uint8, device=device)
        for (i, x), img in zip(jobs, decoded, strict=True):
            left, top, right, bottom = (round(v) for v in x.box)
            crop = img[None, :, top:bottom, left:right].float()
            y = torch.nn.functional.interpolate(
                crop, (self.size, self.size), mode=self.interpolation, antialias=True,
                align_corners=False,
            )  # fmt: skip
            out[i] = (y.flip(-1) if x.flip else y)[0].round_().clamp_(0, 255).to(torch.uint8)
        for i, x in enumerate(self.items):
            if not isinstance(x, Encoded):
                out[i] = torch.from_numpy(x).to(device)
        return out

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None, **_: object
    ) -> Tensor:
        return normalise(self.pixels(device), self.mean, self.std).to(dtype or torch.float32)


def normalise(
    pixels_B3HW: Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """uint8 pixels (B,3,H,W) -> float, normalised with the tower's RGB mean and std."""
    m = torch.tensor(mean, device=pixels_B3HW.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=pixels_B3HW.device).view(1, 3, 1, 1) * 255
    return (pixels_B3HW.float() - m) / s
