"""Images/s of the image side of a training step for a frozen timm tower: reading and
decoding images and running the tower on the fly, against reading `setdiv extract`'s cached
token features (the projection head runs in both). Measured in the same run on the same
shards, after one warm-up pass.

    python tools/bench_extract.py --data 'DIR/*.tar' [--arch vit_tiny_patch16_224] [--passes 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from setdiv import config as config_lib  # noqa: E402
from setdiv.data.loaders import build_train_reader  # noqa: E402
from setdiv.data.text import Tokenizer  # noqa: E402
from setdiv.data.vocab import SPECIALS, Vocab  # noqa: E402
from setdiv.extract import extract_shards  # noqa: E402
from setdiv.model.encoders import build_image_encoder  # noqa: E402
from setdiv.model.towers import with_tower_preprocessing  # noqa: E402


def images_per_s(cfg: config_lib.Config, kind: str, tok: Tokenizer, passes: int) -> float:
    encoder = build_image_encoder(cfg.model.image, cfg.model.embed_dim).eval()
    reader = build_train_reader(cfg.data, kind, tok, 0, 1, 0)
    for batch in reader.epoch(0):  # warm-up: files in the page cache, threads started
        with torch.no_grad():
            encoder(batch.images, batch.image_mask)
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, passes + 1):
        for batch in reader.epoch(epoch):
            with torch.no_grad():
                encoder(batch.images, batch.image_mask)
            n += batch.images.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="image shards (img2dataset or setdiv)")
    p.add_argument("--arch", default="vit_tiny_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    Vocab.build(["a photo of a thing"]).save(f"{tmp}/vocab.json")
    base = [
        "model.image.name=timm", f"model.image.arch={args.arch}", "model.text.vocab_size=null",
        f"model.text.vocab_path={tmp}/vocab.json",
        f"data.train_shards={args.data}", f"data.batch_size={args.batch_size}",
        "data.num_workers=1", "data.train_transform=test", "data.region_dropout=0",
    ]  # fmt: skip
    cfg = with_tower_preprocessing(config_lib.load([ROOT / "configs/demo.yaml"], base))
    vocab = Vocab.load(f"{tmp}/vocab.json")
    tok = Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        from setdiv.data.shards import ShardSet
        from setdiv.extract import write_indexes

        shards = ShardSet.resolve(args.data, "image", cfg.data.format, cfg.data.caption_key)
        t0 = time.perf_counter()
        extract_shards(cfg, shards.paths, shards.format, Path(cache), 64)
        write_indexes(Path(cache), args.arch)
        extract_s = time.perf_counter() - t0
        live = images_per_s(cfg, "image", tok, args.passes)
        cached_cfg = config_lib.override(cfg, [f"data.features={cache}"])
        cached = images_per_s(cached_cfg, "regions", tok, args.passes)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {machine}; torch threads {torch.get_num_threads()}; {args.arch}, "
          f"{shards.num_samples} images, batch {args.batch_size}")  # fmt: skip
    print(f"| path | images/s |\n|---|---:|\n| on the fly (decode + tower + head) | {live:.1f} |")
    print(f"| from the cache (read features + head) | {cached:.1f} |")
    print(f"cache: {cached / live:.1f}x the images/s; extraction took {extract_s:.1f} s")


if __name__ == "__main__":
    main()
