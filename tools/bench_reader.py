"""Training-reader throughput (samples/s) for BUTD region features and for JPEG images, with
and without data workers; plus the time to the first batch of an epoch resumed 80% of the way
in, against the first batch of a fresh epoch measured in the same run.

To compare the reader of two commits, run `tools/bench_reader_epoch.py` in fresh processes
with a `git worktree` of the other commit first on PYTHONPATH (its docstring shows how).

Writes its own shards into a temporary directory: BUTD-sized region features (36 x 2048,
stored float16, via the SCAN `precomp` converter) and COCO-sized JPEGs (640 x 480, via the
Karpathy converter). Each case runs `--repeats` times and reports the median.

    python tools/bench_reader.py [--regions 2000] [--images 600] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from setdiv.config import TextEncoderConfig  # noqa: E402
from setdiv.data import convert, reader  # noqa: E402
from setdiv.data.shards import write_shards  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=2000)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
