"""Training-reader throughput (samples/s) for BUTD region features and for 224 px JPEG images.

Writes its own shards into a temporary directory: BUTD-sized region features (36 x 2048,
stored float16, via the SCAN `precomp` converter) and COCO-sized JPEGs (640 x 480, via the
Karpathy converter), then times one epoch of `TrainReader` with 2 workers, against the same
reader with 0 workers (decoding in the main process) as the baseline.

    python tools/bench_reader.py [--regions 2000] [--images 600] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from setdiv.data import convert
from setdiv.data.reader import SampleOptions, TrainReader
from setdiv.data.shards import write_shards
from setdiv.data.text import Tokenizer
from setdiv.data.vocab import SPECIALS, Vocab


def write_region_shards(root: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    ims = np.lib.format.open_memmap(root / "train_ims.npy", "w+", np.float32, (n, 36, 2048))
    for i in range(0, n, 256):
        ims[i : i + 256] = rng.standard_normal((min(256, n - i), 36, 2048), dtype=np.float32)
    ims.flush()
    caps = [f"a man riding a horse on a beach number {i}" for i in range(5 * n)]
    (root / "train_caps.txt").write_text("\n".join(caps) + "\n")
    out = root / "regions"
    write_shards(convert.precomp_samples(root, "train"), out, "train", "regions", "bench", 200)
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
    write_shards(samples, out, "train", "image", "bench", 100)
    return f"{out}/train-*.tar"


def throughput(pattern: str, opts: SampleOptions, workers: int, batch: int) -> float:
    reader = TrainReader(pattern, opts, batch, num_workers=workers, shuffle_buffer=200)
    t0 = time.perf_counter()
    n = sum(b.images.shape[0] for b in reader.epoch(0))
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=2000)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    vocab = Vocab.build(["a man riding a horse on a beach number photo of scene variant"])
    tok = Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        regions = write_region_shards(root, args.regions)
        jpegs = write_jpeg_shards(root, args.images)
        cases = [
            (
                "BUTD regions 36x2048 fp16",
                regions,
                SampleOptions("regions", tok, True, 224, 0.2, 0.2),
                100,
            ),
            (
                "JPEG 640x480 -> 224 crop",
                jpegs,
                SampleOptions("image", tok, True, 224, 0.0, 0.2),
                50,
            ),
        ]
        print(f"{'input':<28}{'0 workers':>12}{f'{args.workers} workers':>12}{'speed-up':>10}")
        for name, pattern, opts, batch in cases:
            base = throughput(pattern, opts, 0, batch)
            fast = throughput(pattern, opts, args.workers, batch)
            print(f"{name:<28}{base:>10.0f}/s{fast:>10.0f}/s{fast / base:>9.2f}x")


if __name__ == "__main__":
    main()
