"""JPEG decoding at the size the transform needs (setdiv/data/images.py): the DCT scale it
picks, the pixels it gives against the exact (official) pipeline, and the odd files (PNG,
grayscale, CMYK, progressive, truncated, bombs) it must treat as before."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from setdiv.config import load
from setdiv.data.images import _draft, image_transform, image_transform_steps
from setdiv.data.samples import SampleOptions, decode_sample, sample_options

CC12M = Path(__file__).parents[2] / "shared/data/cc12m_img2dataset_32/cc12m-train-0000.tar"

CASES = [  # (train, style, size)
    (False, "crop", 224),
    (True, "crop", 224),
    (False, "gpo512", 512),
    (True, "gpo512", 512),
    (False, "crop", 64),
    (True, "crop", 64),
]


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like test image: smooth gradients, a few edges, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack(
        [
            128 + 100 * np.sin(6 * xx + 2 * yy),
            128 + 90 * np.cos(5 * yy - 3 * xx),
            255 * ((xx * 7).astype(int) % 2) * 0.5 + 60 * yy,
        ],
        -1,
    )
    return Image.fromarray((base + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8))


def jpeg(im: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def opts(size: int, style: str, fast: bool) -> SampleOptions:
    return SampleOptions("image", None, True, size, style, fast_decode=fast)  # type: ignore[arg-type]


def both(data: bytes, train: bool, style: str, size: int, seed: int = 0):  # noqa: ANN201
    out = []
    for fast in (False, True):
        torch.manual_seed(seed)  # the same crop and flip draws both ways
        out.append(image_transform(opts(size, style, fast), train)(Image.open(io.BytesIO(data))))
    return out


def test_the_smallest_dct_scale_that_covers_the_transform_is_chosen(monkeypatch) -> None:  # noqa: ANN001
    from setdiv.data import images

    data = jpeg(photo(2000, 1500))
    # test crop at 224: the shorter side must stay >= 256: 1500 / 4 = 375, 1500 / 8 < 256
    im = Image.open(io.BytesIO(data))
    assert _draft(im, 2000 * 256 / 1500, 256) == 4 and im.size == (500, 375)
    # gpo512 test: both sides >= 512: 1500 / 2 = 750, 1500 / 4 < 512
    im = Image.open(io.BytesIO(data))
    assert _draft(im, 512, 512) == 2 and im.size == (1000, 750)
    # a crop of 300 x 900 for 224: its width allows no scaling
    im = Image.open(io.BytesIO(data))
    assert _draft(im, 224 * 2000 / 300, 224 * 1500 / 900) == 1 and im.size == (2000, 1500)
    # a training crop: the exact path's draws, and the scale that keeps the crop >= size, in
    # the region decoder (its scale in eighths) and in Pillow's fallback (a draft's size)
    o = opts(64, "crop", True)
    crop = image_transform_steps(64, True)[0]
    for seed in range(20):
        torch.manual_seed(seed)
        p = crop.make_params([Image.open(io.BytesIO(data))])
        s = max(f for f in (1, 2, 4, 8) if min(p["width"], p["height"]) / f >= 64)
        if images._jpeg is not None:  # (not built: docs/data.md; the fallback is tested below)
            calls: list = []
            real = images._jpeg.decode
            monkeypatch.setattr(
                images._jpeg, "decode", lambda *a, c=calls, r=real: c.append(a) or r(*a)
            )
            torch.manual_seed(seed)
            image_transform(o, True)(Image.open(io.BytesIO(data)), data)
            assert len(calls) == 1 and calls[0][1] == 8 // s, (seed, p, calls[0][1:])
        monkeypatch.setattr(images, "_jpeg", None)
        im = Image.open(io.BytesIO(data))
        seen: list = []

        def draft(mode, size, real=im.draft, seen=seen):  # noqa: ANN001, ANN202
            seen.append(real(mode, size))
            return seen[-1]

        im.draft = draft
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the one about the missing decoder)
            image_transform(o, True)(im)
        assert round(2000 / seen[0][1][2]) == s, (seed, p)
        monkeypatch.undo()


@pytest.mark.parametrize(("train", "style", "size"), CASES)
def test_fast_decoding_is_pixel_close_to_the_exact_pipeline(
    train: bool, style: str, size: int
) -> None:
    """Same region, same flip: the mean absolute difference of the uint8 model input stays
    within a couple of levels (a wrong crop or a missed flip would differ by tens)."""
    for seed, (w, h) in enumerate([(640, 480), (1024, 768), (333, 500), (1600, 1200)]):
        exact, fast = both(jpeg(photo(w, h, seed)), train, style, size, seed)
        assert exact.shape == fast.shape == (3, size, size) and fast.dtype == np.uint8
        mad = np.abs(exact.astype(float) - fast).mean()
        assert mad < 2.0, (w, h, mad)
    # a shifted crop (the test box off by 8 px) would not pass that bound:
    exact, _ = both(jpeg(photo(1024, 768)), False, "crop", 224)
    shifted = np.asarray(photo(1024, 768).resize((298, 224), Image.BILINEAR))[:, 45:269]
    assert np.abs(exact.astype(float) - shifted.transpose(2, 0, 1)).mean() > 4.0


@pytest.mark.skipif(not CC12M.exists(), reason=f"{CC12M} (real CC12M photos) is absent")
@pytest.mark.parametrize(("train", "style", "size"), CASES[:4])
def test_fast_decoding_on_real_photos(train: bool, style: str, size: int) -> None:
    with tarfile.open(CC12M) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    mads = []
    for i, data in enumerate(jpgs):
        exact, fast = both(data, train, style, size, i)
        mads.append(np.abs(exact.astype(float) - fast).mean())
    assert len(jpgs) == 32 and np.mean(mads) < 1.5 and max(mads) < 5.0, mads


def test_off_gives_the_official_pipeline_exactly() -> None:
    from torchvision.transforms import v2

    data = jpeg(photo(800, 600))
    for train in (False, True):
        torch.manual_seed(1)
        got = image_transform(opts(224, "crop", False), train)(Image.open(io.BytesIO(data)))
        torch.manual_seed(1)
        ref = v2.Compose([v2.ToImage(), *image_transform_steps(224, train)])
        want = ref(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        assert np.array_equal(got, want)
    cfg = load([], ["data.fast_decode=false"])
    assert sample_options(cfg.data, "image", None, True).fast_decode is False  # type: ignore[arg-type]
    assert sample_options(load([], []).data, "image", None, True).fast_decode is True  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["png", "grayscale", "cmyk", "progressive"])
def test_other_files_decode_as_before(kind: str) -> None:
    im = photo(900, 700, 3)
    if kind == "png":
        buf = io.BytesIO()
        im.save(buf, "PNG")
        data = buf.getvalue()
    elif kind == "grayscale":
        data = jpeg(im.convert("L"))
    elif kind == "cmyk":
        data = jpeg(im.convert("CMYK"))
    else:
        data = jpeg(im, progressive=True)
    assert Image.open(io.BytesIO(data)).mode == {"cmyk": "CMYK", "grayscale": "L"}.get(kind, "RGB")
    for train in (False, True):
        exact, fast = both(data, train, "crop", 224, 5)
        assert fast.shape == (3, 224, 224)
        assert np.abs(exact.astype(float) - fast).mean() < 2.0, kind


def test_truncated_jpegs_and_bombs_are_skipped_and_counted(monkeypatch) -> None:  # noqa: ANN001
    from setdiv.data import samples

    data = jpeg(photo(1200, 900))
    tok = type("Tok", (), {"encode": staticmethod(lambda c: [1, 2])})()
    o = SampleOptions("image", tok, False, 224, format="setdiv")  # type: ignore[arg-type]
    meta = b'{"image_id": "x", "caption_ids": [0], "captions": ["a b"]}'
    ok = {"__key__": "k", "__url__": "u", "jpg": data, "json": meta}
    monkeypatch.setattr(samples, "decode_meta", lambda raw, five=True: {
        "image_id": "x", "caption_ids": [0], "captions": ["a b"]})  # fmt: skip
    transform = image_transform(o, False)
    assert decode_sample(ok, o, transform, [0])["image"].shape == (3, 224, 224)
    before = samples.WARN.count
    bad = dict(ok, jpg=data[: len(data) // 2])
    assert decode_sample(bad, o, transform, [0]) is None
    assert samples.WARN.count == before + 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200 * 900 // 4)  # the check at open
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert decode_sample(ok, o, transform, [0]) is None
    assert samples.WARN.count == before + 2


# --- decoding on the device (data.image_decode=device) ----------------------------------------


def device_opts(size: int, style: str) -> SampleOptions:
    o = opts(size, style, True)
    o.image_decode = "device"
    return o


@pytest.mark.parametrize(("train", "style", "size"), CASES[:4])
def test_device_decoding_matches_the_worker_path(train: bool, style: str, size: int) -> None:
    """The JPEGs a worker leaves encoded decode (here with libjpeg on the CPU; nvJPEG on a
    GPU) to the pixels the worker would have made: same crop, same flip, close values."""
    from setdiv.data.images import DeviceImages, Encoded

    files = [
        jpeg(photo(w, h, i)) for i, (w, h) in enumerate([(640, 480), (333, 500), (1600, 1200)])
    ]
    items, want = [], []
    for i, data in enumerate(files):
        torch.manual_seed(i)
        items.append(
            image_transform(device_opts(size, style), train)(Image.open(io.BytesIO(data)), data)
        )
        torch.manual_seed(i)
        want.append(image_transform(opts(size, style, True), train)(Image.open(io.BytesIO(data))))
    assert all(isinstance(x, Encoded) for x in items)
    got = DeviceImages(items, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).pixels("cpu")
    for g, w in zip(got.numpy(), want, strict=True):
        assert np.abs(g.astype(float) - w).mean() < 2.0


def test_device_batches_from_the_training_reader(tmp_path: Path) -> None:
    """A training epoch read with data.image_decode=device gives the batches of the worker
    path once moved: same images in the same order, pixels close; CMYK and PNG files are
    decoded by the worker and sit in the same batch."""
    from setdiv.data.images import DeviceImages
    from setdiv.data.reader import TrainReader
    from setdiv.data.shards import Sample, write_shards

    def samples():  # noqa: ANN202
        for i in range(12):
            im = photo(320 + 16 * i, 240, i)
            data = jpeg(im.convert("CMYK")) if i == 3 else jpeg(im)
            if i == 7:
                buf = io.BytesIO()
                im.save(buf, "PNG")
                data = buf.getvalue()
            caps = [f"photo {i} caption {j}" for j in range(5)]
            yield Sample(str(i), caps, list(range(5)), jpg=data)

    write_shards(samples(), tmp_path, "train", "image", "test", 6)
    tok = type("Tok", (), {"encode": staticmethod(lambda c: [1, 2, 3]), "pad_id": 0})()
    batches = {}
    for mode in ("workers", "device"):
        o = SampleOptions("image", tok, True, 64, format="setdiv", image_decode=mode)  # type: ignore[arg-type]
        reader = TrainReader(f"{tmp_path}/train-*.tar", o, 6, num_workers=2, shuffle_buffer=1)
        batches[mode] = list(reader.epoch(0))
    assert len(batches["device"]) == 2
    for a, b in zip(batches["workers"], batches["device"], strict=True):
        assert isinstance(b.images, DeviceImages) and a.image_ids == b.image_ids
        assert b.images.shape == a.images.shape == (6, 3, 64, 64)
        moved = b.images.to("cpu", torch.bfloat16)
        assert moved.dtype == torch.bfloat16
        assert (moved.float() - a.images).abs().mean() < 0.05  # (normalised: ~2 levels / 58)
