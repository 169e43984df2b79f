"""Does decoding at the DCT scale change what a trained model retrieves? One model, evaluated
both ways on the same test images.

Writes synthetic image shards (scenes rendered at 256 px; the model reads 64 px, so the test
transform decodes them at 1/2 scale and training crops at up to 1/4), trains a small
random-init timm ResNet-10t + bi-GRU set model with `setdiv train` (fast decoding, the
default), exports it and runs `setdiv eval` on the test split twice: `data.fast_decode=true`
and `data.fast_decode=false` (every image decoded whole, the official pipeline). Prints both
RSUMs and their difference.

    python tools/bench_decode_rsum.py [--train 2000] [--test 1000] [--epochs 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def setdiv(*args: str) -> None:
    cmd = [sys.executable, "-m", "setdiv.cli", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="keep the run here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        data, run = work / "data", work / "run"
        t0 = time.time()
        for split, n in (("train", args.train), ("test", args.test)):
            setdiv("shards", "synthetic", "--split", split, "--images", str(n), "--kind", "image",
                   "--image-size", "256", "--shard-size", "250", "--out", str(data))  # fmt: skip
        setdiv("vocab", "--shards", f"{data}/train-*.tar", "--out", f"{data}/vocab.json")
        setdiv(
            "train", "configs/demo.yaml", "--run-dir", str(run),
            "model.image.name=timm", "model.image.arch=resnet10t", "model.image.weights=null",
            f"model.text.vocab_path={data}/vocab.json", "model.text.vocab_size=null",
            f"data.train_shards={data}/train-*.tar", "data.val_shards=null",
            "data.image_size=64", "data.batch_size=64", "data.num_workers=1",
            f"train.epochs={args.epochs}", "train.log_every=50",
        )  # fmt: skip
        setdiv("export", str(run))
        rsum = {}
        for fast in ("true", "false"):
            out = work / f"eval_fast_{fast}"
            setdiv("eval", str(run), "--data", f"{data}/test-*.tar", "--protocol", "coco",
                   "--out", str(out), f"data.fast_decode={fast}")  # fmt: skip
            metrics = json.loads((out / "metrics.json").read_text())
            rsum[fast] = next(v["rsum"] for k, v in metrics.items() if k.startswith("coco"))
        print(f"\n{args.train} train / {args.test} test images, {args.epochs} epochs, "
              f"{time.time() - t0:.0f} s in all")  # fmt: skip
        print(f"test RSUM, fast decoding (DCT-scaled): {rsum['true']:.2f}")
        print(f"test RSUM, every image decoded whole:  {rsum['false']:.2f}")
        print(f"difference: {rsum['true'] - rsum['false']:+.2f}")


if __name__ == "__main__":
    main()
