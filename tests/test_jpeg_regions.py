"""The compiled JPEG region decoder (setdiv/data/_jpeg.c, through images.py): a region decoded
with cropping and skipped rows equals the same pixels of a whole decode by Pillow's own
libjpeg-turbo; its resize equals Pillow's to a level; files it must not take (truncated below
the region, CMYK, corrupt) still fail or fall back as before; and without it, Pillow's path."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_images import jpeg, opts, photo

from setdiv.data import images
from setdiv.data.images import _decode_box, image_transform
from setdiv.data.samples import SampleOptions, decode_sample

built = pytest.mark.skipif(
    images._jpeg is None, reason="setdiv.data._jpeg not built (no libjpeg-turbo headers)"
)


def whole(data: bytes, num: int) -> np.ndarray:
    """(H,W,3) the file decoded whole by Pillow at scale num/8 (its `draft`)."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    im.draft(im.mode, (w * num // 8, h * num // 8))
    assert im.size == (-(-w * num // 8), -(-h * num // 8))
    return np.asarray(im.convert("RGB"))


def region(data: bytes, num: int, area: tuple[int, int, int, int], box: tuple[int, int, int]):  # noqa: ANN201
    """(size,size,3) the integer box (left, top, size) of a region decode: no resize."""
    x, y, size = box
    box_ = (x, y, x + size, y + size)
    out = images._jpeg.decode(data, num, *area, False, box_, size, False, False)
    return np.frombuffer(out, np.uint8).reshape(3, size, size).transpose(1, 2, 0)


@built
@pytest.mark.parametrize("kind", ["baseline 4:2:0", "4:4:4", "progressive", "grayscale"])
def test_a_region_equals_the_same_pixels_of_a_whole_decode(kind: str) -> None:
    """Random regions (cropped left and right, rows skipped above, stopped early below) at every
    scale; the kept box stays 2 px inside the region's sides, as images.py keeps it (libjpeg
    replicates a horizontal crop's edge pixels in its chroma upsampling)."""
    im = photo(1003, 757, 2)
    data = {
        "baseline 4:2:0": lambda: jpeg(im),
        "4:4:4": lambda: jpeg(im, subsampling=0),
        "progressive": lambda: jpeg(im, progressive=True),
        "grayscale": lambda: jpeg(im.convert("L")),
    }[kind]()
    rng = np.random.default_rng(0)
    for num in (1, 2, 4, 8):
        ref = whole(data, num)
        h, w = ref.shape[:2]
        for _ in range(6):
            size = int(rng.integers(8, min(w, h) // 2))
            x, y = int(rng.integers(2, w - size - 2)), int(rng.integers(0, h - size))
            area = (
                max(0, x - 2 - int(rng.integers(0, 20))),
                max(0, y - int(rng.integers(0, 20))),
                min(w, x + size + 2 + int(rng.integers(0, 20))),
                min(h, y + size + int(rng.integers(0, 20))),
            )
            got = region(data, num, area, (x, y, size))
            assert np.array_equal(got, ref[y : y + size, x : x + size]), (num, area, x, y, size)


@built
def test_the_resize_is_pillows_within_rounding() -> None:
    """Sub-pixel boxes, shrinking 3x to enlarging, bilinear and bicubic, mirrored: against
    Pillow's decode at the same scale and Pillow's resize (the fallback path's tools)."""
    data = jpeg(photo(1000, 700, 1))
    cases = [  # (scale in eighths, box in full-size pixels, size, filter, flip)
        (4, (101.3, 57.9, 803.2, 650.1), 224, Image.Resampling.BILINEAR, False),
        (8, (10.5, 20.25, 610.0, 690.0), 224, Image.Resampling.BICUBIC, True),
        (2, (0.0, 0.0, 1000.0, 700.0), 64, Image.Resampling.BILINEAR, False),
        (8, (300.0, 200.0, 500.0, 400.0), 224, Image.Resampling.BILINEAR, True),  # enlarges
        (8, (0.0, 0.0, 700.0, 700.0), 224, Image.Resampling.BICUBIC, False),  # shrinks 3x
    ]
    for num, box, size, resample, flip in cases:
        images.SCALES, saved = (num,), images.SCALES
        try:
            got = _decode_box(data, (1000, 700), box, size, resample, flip)
        finally:
            images.SCALES = saved
        k = num / 8
        ref = Image.fromarray(whole(data, num)).resize(
            (size, size), resample, box=tuple(v * k for v in box)
        )
        if flip:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        diff = np.abs(got.astype(int) - np.asarray(ref).transpose(2, 0, 1))
        # (rows then columns here, columns then rows in Pillow: the rounding in between differs)
        assert got.shape == (3, size, size) and diff.max() <= 2 and diff.mean() < 0.3, (box, diff)


def sample(data: bytes) -> dict:
    meta = b'{"image_id": "x", "caption_ids": [0], "captions": ["a b"]}'
    return {"__key__": "k", "__url__": "u", "jpg": data, "json": meta}


@built
def test_a_file_truncated_below_the_region_is_still_skipped(monkeypatch) -> None:  # noqa: ANN001
    """The centre crop of a tall photo ends well above the bottom, where a truncated file
    lacks its rows and its end marker: decoding must not stop at the crop and pass it."""
    from setdiv.data import samples

    tok = type("Tok", (), {"encode": staticmethod(lambda c: [1, 2])})()
    o = SampleOptions("image", tok, False, 224, format="setdiv")  # type: ignore[arg-type]
    monkeypatch.setattr(samples, "decode_meta", lambda raw, five=True: {
        "image_id": "x", "caption_ids": [0], "captions": ["a b"]})  # fmt: skip
    transform = image_transform(o, False)
    data = jpeg(photo(600, 1800, 4))
    cut = data[: int(len(data) * 0.9)]  # the bottom ~10% of the rows and the end marker gone
    left, top, right, bottom = images._test_box(600, 1800, 224, "crop", 0.875)
    assert bottom < 1800 * 0.8  # (the region the crop needs is all still there)
    assert _decode_box(data, (600, 1800), (left, top, right, bottom), 224, 2) is not None
    assert _decode_box(cut, (600, 1800), (left, top, right, bottom), 224, 2) is None
    before = samples.WARN.count
    assert decode_sample(sample(data), o, transform, [0])["image"].shape == (3, 224, 224)
    assert decode_sample(sample(cut), o, transform, [0]) is None
    assert samples.WARN.count == before + 1
    # bytes after the end marker (some cameras and sites append them) decode as before
    padded = data + b"\x00" * 100
    got = decode_sample(sample(padded), o, transform, [0])["image"]
    assert np.array_equal(got, decode_sample(sample(data), o, transform, [0])["image"])


@built
@pytest.mark.parametrize("kind", ["cmyk", "corrupt"])
def test_files_the_decoder_declines_take_pillows_path(kind: str) -> None:
    """CMYK (libjpeg-turbo will not convert it to RGB) and data corrupt enough for a libjpeg
    warning: the region decoder gives None, and the transform decodes with Pillow (here at
    1/2, as the box allows), to within rounding of Pillow's own resize."""
    im = photo(800, 600, 5)
    if kind == "cmyk":
        data = jpeg(im.convert("CMYK"))
    else:
        clean = bytearray(jpeg(im))
        sos = clean.index(b"\xff\xda")
        clean[sos + 400 : sos + 402] = b"\xff\xd5"  # a stray marker in the entropy-coded data
        data = bytes(clean)
    box = images._test_box(800, 600, 224, "crop", 0.875)
    assert images._jpeg is not None
    with pytest.raises(ValueError):
        images._jpeg.decode(data, 8, 0, 0, 800, 600, True, box, 224, False, False)
    assert _decode_box(data, (800, 600), box, 224, 2) is None
    got = image_transform(opts(224, "crop", True), False)(Image.open(io.BytesIO(data)), data)
    half = Image.fromarray(whole(data, 4))  # (600 / 2 >= 256: it decodes at 1/2)
    want = np.asarray(half.resize((224, 224), Image.Resampling.BILINEAR, box=[v / 2 for v in box]))
    diff = np.abs(got.astype(int) - want.transpose(2, 0, 1))  # (Pillow's decode, our resize)
    assert diff.max() <= 2 and diff.mean() < 0.3


@built
def test_an_image_pillow_decoded_gives_the_region_decoders_pixels() -> None:
    """The Python API decodes a caller's PIL image whole (`preprocess`), a file path through
    the region decoder: at the same scale both routes give the same pixels, bit for bit."""
    data = jpeg(photo(400, 300, 7))  # (a 256 px resize of 300 px: no DCT scale, both whole)
    transform = image_transform(opts(224, "crop", True), False)
    by_region = transform(Image.open(io.BytesIO(data)), data)
    loaded = Image.open(io.BytesIO(data))
    loaded.load()
    assert images.jpeg_bytes(loaded, None) is None  # (nothing left to read: Pillow's route)
    assert np.array_equal(transform(loaded), by_region)
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, "PNG")
    assert np.array_equal(transform(Image.open(io.BytesIO(png.getvalue()))), by_region)


def test_without_the_decoder_pillow_decodes_and_says_so(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(images, "_jpeg", None)
    images._warn_once_without_decoder.cache_clear()
    assert images.decoder() == "Pillow draft"
    data = jpeg(photo(1024, 768, 6))
    with pytest.warns(UserWarning, match="libjpeg-turbo"):
        fast = image_transform(opts(224, "crop", True), False)(Image.open(io.BytesIO(data)), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        image_transform(opts(224, "crop", True), True)
    exact = image_transform(opts(224, "crop", False), False)(Image.open(io.BytesIO(data)))
    assert np.abs(exact.astype(float) - fast).mean() < 2.0
    images._warn_once_without_decoder.cache_clear()


@built
def test_threads_decode_at_once() -> None:
    """The decoder lets go of the GIL and keeps its buffers per thread: four threads decoding
    the same files give what one does."""
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(32):
        w, h = 500 + 40 * (i % 8), 400 + 30 * (i % 8)
        x, y = rng.uniform(0, w / 3), rng.uniform(0, h / 3)
        box = (x, y, x + rng.uniform(w / 3, w * 2 / 3), y + rng.uniform(h / 3, h * 2 / 3))
        jobs.append((jpeg(photo(w, h, i % 8)), (w, h), box, 64 + 32 * (i % 5), 2, bool(i % 2)))

    alone = [_decode_box(*job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda job: _decode_box(*job), jobs))
    assert all(a is not None and np.array_equal(a, b) for a, b in zip(alone, together, strict=True))
