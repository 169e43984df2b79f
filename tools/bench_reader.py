"""Training-reader throughput (samples/s) for BUTD region features and for JPEG images, with
and without data workers; plus the time to the first batch of an epoch resumed 80% of the way
in, against the first batch of a fresh epoch measured in the same run.

To compare the reader of two commits, run `tools/bench_reader_epoch.py` in fresh processes
with a `git worktree` of the other commit first on PYTHONPATH (its docstring shows how).

Writes its own shards into a temporary directory: BUTD-sized region features (36 x 2048,
stored float16, via the SCAN `precomp` converter) and COCO-sized JPEGs (640 x 480, via the
Karpathy converter). Each case runs `--repeats` times and reports the median.

First, decoding per core (one process, one thread): images/s of the test (Resize + CenterCrop)
and train (RandomResizedCrop + flip) transforms at 224 px on the 32 real CC12M photos of
../shared/data (where present) and on COCO-sized 640 x 480 JPEGs, today's path (decode whole,
torchvision pipeline: `data.fast_decode=false`) against decoding the region the transform
keeps at the DCT scale it needs (`data.fast_decode=true`; the decoder in use is printed), with
the mean absolute difference of the uint8 model input between the two. The two paths take
turns within each repeat, so that a slow spell of a shared machine falls on both. With
`--device cuda` also the device path (`data.image_decode=device`: nvJPEG batch decode +
crop/resize on the GPU), in images/s.

    python tools/bench_reader.py [--regions 2000] [--images 600] [--workers 2] [--repeats 3] \
        [--decode-only] [--device cuda] [--scales 1,2,4,8] [--pillow]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from setdiv.config import TextEncoderConfig  # noqa: E402
from setdiv.data import convert, images, reader  # noqa: E402
from setdiv.data.images import DeviceImages, decoder, image_transform  # noqa: E402
from setdiv.data.samples import SampleOptions  # noqa: E402
from setdiv.data.shards import write_shards  # noqa: E402

CC12M = Path(__file__).parents[2] / "shared/data/cc12m_img2dataset_32/cc12m-train-0000.tar"
from setdiv.data.text import build_tokenizer  # noqa: E402
from setdiv.data.vocab import Vocab  # noqa: E402


def write_region_shards(root: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    ims = np.lib.format.open_memmap(root / "train_ims.npy", "w+", np.float32, (n, 36, 2048))
    for i in range(0, n, 256):
        ims[i : i + 256] = rng.standard_normal((min(256, n - i), 36, 2048), dtype=np.float32)
    ims.flush()
    caps = [f"a man riding a horse on a beach number {i}" for i in range(5 * n)]
    (root / "train_caps.txt").write_text("\n".join(caps) + "\n")
    out = root / "regions"
    write_shards(convert.precomp_samples(root, "train"), out, "train", "regions", "bench", 100)
    return f"{out}/train-*.tar"


def write_jpeg_shards(root: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    images = []
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * 3) % 256, (xx + yy + 11 * i) % 256], -1)
        noise = rng.integers(0, 40, size=(480, 640, 3))
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(
            root / "img" / f"{i}.jpg", quality=90
        )
        sents = [
            {"raw": f"a photo of scene {i} variant {j}", "sentid": 5 * i + j} for j in range(5)
        ]
        images.append({"filename": f"{i}.jpg", "split": "train", "imgid": i, "sentences": sents})
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    out = root / "jpeg"
    samples = convert.karpathy_samples(root / "karpathy.json", root / "img", "train")
    write_shards(samples, out, "train", "image", "bench", 50)
    return f"{out}/train-*.tar"


def epoch_rate(module, pattern: str, opts: dict, workers: int, batch: int) -> float:  # noqa: ANN001
    """Samples per second over one whole epoch."""
    train = module.TrainReader(
        pattern, module.SampleOptions(**opts), batch, num_workers=workers, shuffle_buffer=200
    )
    t0 = time.perf_counter()
    n = sum(b.images.shape[0] for b in train.epoch(0))
    return n / (time.perf_counter() - t0)


def resume_wait(module, pattern: str, opts: dict, workers: int, batch: int, at: float) -> float:  # noqa: ANN001
    """Seconds to the first batch of epoch 0 resumed at fraction `at` of its batches."""
    train = module.TrainReader(
        pattern, module.SampleOptions(**opts), batch, num_workers=workers, shuffle_buffer=200
    )
    t0 = time.perf_counter()
    batches = train.epoch(0, int(at * train.batches_per_epoch))
    next(batches)
    wait = time.perf_counter() - t0
    batches.close()
    return wait


def coco_sized_jpegs(n: int) -> list[bytes]:
    """640 x 480 photo-like JPEGs (gradients, edges, noise), quality 90."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640] / 640
    out = []
    for i in range(n):
        base = np.stack(
            [
                128 + 100 * np.sin((6 + i % 5) * xx + 2 * yy),
                128 + 90 * np.cos(5 * yy - (3 + i % 3) * xx),
                127 * ((xx * (7 + i % 4)).astype(int) % 2) + 60 * yy,
            ],
            -1,
        )
        px = (base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_rates(files: list[bytes], train: bool, repeats: int):  # noqa: ANN201
    """(images/s on one core today, images/s fast, both uint8 outputs) of one transform over
    `files`: the two paths alternate within each repeat, so a slow spell of a shared machine
    falls on both."""
    transforms = [
        image_transform(SampleOptions("image", None, True, 224, "crop", fast_decode=fast), train)  # type: ignore[arg-type]
        for fast in (False, True)
    ]  # fmt: skip
    times: list[list[float]] = [[], []]
    outs: list[list[np.ndarray]] = [[], []]
    for _ in range(repeats):
        for i, transform in enumerate(transforms):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            outs[i] = [transform(Image.open(io.BytesIO(f)), f) for f in files]  # (as readers do)
            times[i].append(time.perf_counter() - t0)
    today, fast = (len(files) / statistics.median(t) for t in times)
    return today, fast, outs[0], outs[1]


def device_rate(files: list[bytes], train: bool, device: str, repeats: int) -> float:
    """Images/s of the device path: worker step (header, draws) + batch decode on `device`."""
    o = SampleOptions("image", None, True, 224, "crop", image_decode="device")  # type: ignore[arg-type]
    transform = image_transform(o, train)
    times = []
    for _ in range(repeats + 1):  # (the first: CUDA context, nvJPEG handles)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        items = [transform(Image.open(io.BytesIO(f)), f) for f in files]
        DeviceImages(items, 224, (0.5,) * 3, (0.25,) * 3).pixels(device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return len(files) / statistics.median(times[1:])


def decoding(repeats: int, device: str) -> None:
    torch.set_num_threads(1)
    sets = [("COCO-sized 640x480", coco_sized_jpegs(64))]
    if CC12M.exists():
        with tarfile.open(CC12M) as tar:
            jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        sets.insert(0, ("CC12M photos (32 real)", jpgs))
    else:
        print(f"({CC12M} absent: the CC12M rows are left out)")
    print(f"decoding per core, 224 px, images/s: today (decode whole) | fast ({decoder()})")
    print(f"{'images':<24}{'transform':<10}{'today':>8}{'fast':>8}{'ratio':>8}{'|diff|':>8}"
          + (f"{device + ' path':>13}" if device != "cpu" else ""))  # fmt: skip
    for name, files in sets:
        for train in (False, True):
            exact, fast, a, b = decode_rates(files, train, repeats)
            mad = np.mean([np.abs(x.astype(float) - y).mean() for x, y in zip(a, b, strict=True)])
            row = f"{name:<24}{'train' if train else 'test':<10}{exact:>8.0f}{fast:>8.0f}"
            row += f"{fast / exact:>7.2f}x{mad:>8.2f}"
            if device != "cpu":
                row += f"{device_rate(files, train, device, repeats):>13.0f}"
            print(row)
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=2000)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-only", action="store_true", help="only the decoding table")
    parser.add_argument("--device", default="cpu", help="also time the device path (cuda)")
    parser.add_argument(
        "--scales", default="1,2,4,8", help="the region decoder's DCT scales, in eighths (1-8)"
    )
    parser.add_argument(
        "--pillow", action="store_true", help="fast path without the compiled decoder (fallback)"
    )
    args = parser.parse_args()
    images.SCALES = tuple(sorted(int(m) for m in args.scales.split(",")))
    if args.pillow:
        images._jpeg = None
    decoding(args.repeats, args.device)
    if args.decode_only:
        return
    vocab = Vocab.build(["a man riding a horse on a beach number photo of scene variant"])
    tok = build_tokenizer(TextEncoderConfig(), vocab)
    dropouts = {"region_dropout": 0.2, "word_dropout": 0.2}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = [
            ("BUTD regions 36x2048 fp16", write_region_shards(root, args.regions), "regions", 100),
            ("JPEG 640x480 -> 224 crop", write_jpeg_shards(root, args.images), "image", 50),
        ]
        print(f"{'input':<27}{'workers':>8}{'samples/s':>11}")
        for name, pattern, kind, batch in cases:
            opts = {"kind": kind, "tokenizer": tok, "train": True, **dropouts}
            for workers in (0, args.workers):
                rate = statistics.median(
                    epoch_rate(reader, pattern, opts, workers, batch) for _ in range(args.repeats)
                )
                print(f"{name:<27}{workers:>8}{rate:>11.0f}")
            fresh = statistics.median(
                resume_wait(reader, pattern, opts, args.workers, batch, 0.0)
                for _ in range(args.repeats)
            )
            resumed = statistics.median(
                resume_wait(reader, pattern, opts, args.workers, batch, 0.8)
                for _ in range(args.repeats)
            )
            print(f"{name:<27}{args.workers:>8}   first batch: fresh epoch {fresh:.2f} s, "
                  f"resumed at 80% {resumed:.2f} s ({resumed / fresh:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
