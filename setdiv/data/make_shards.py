"""`setdiv shards`: convert a source (SCAN features, Karpathy JSON, synthetic) into WebDataset
shards."""

from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

from setdiv.data import convert
from setdiv.data.shards import ShardIndex, write_shards

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output directory for shards and index")
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")

    p = sub.add_parser("precomp", help="SCAN precomputed BUTD region features")
    p.add_argument(
        "--root", required=True, help="directory with {split}_ims.npy, _caps.txt, _ids.txt"
    )
    p.add_argument("--split", required=True, help="train | dev | test | testall")
    p.add_argument("--dataset", choices=("coco", "f30k"), default="coco")
    p.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="storage dtype"
    )
    common(p)

    p = sub.add_parser("karpathy", help="Karpathy split JSON + raw JPEG images")
    p.add_argument("--json", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    p.add_argument("--images", required=True, help="image root directory")
    p.add_argument("--split", required=True, choices=("train", "val", "test"))
    p.add_argument("--restval", action="store_true", help="add COCO restval images to train")
    p.add_argument(
        "--min-captions",
        action="store_true",
        help="drop (and count) images with fewer than 5 captions instead of failing",
    )
    common(p)

    p = sub.add_parser("synthetic", help="the built-in ambiguous synthetic dataset")
    p.add_argument("--split", required=True, choices=("train", "val", "test"))
    p.add_argument("--images", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=("regions", "image"), default="regions")
    p.add_argument("--image-size", type=int, default=64)
    common(p)


def run(args: argparse.Namespace) -> ShardIndex:
    """Convert per the parsed arguments; returns the written index."""
    counter = convert.DropCounter()
    if args.source == "precomp":
        samples = convert.precomp_samples(args.root, args.split, args.dtype)
        kind, source = "regions", f"scan-precomp:{args.dataset}:{args.root}"
    elif args.source == "karpathy":
        samples = convert.karpathy_samples(
            args.json, args.images, args.split, args.restval, args.min_captions, counter
        )
        kind, source = "image", f"karpathy:{args.json}"
    else:
        samples = convert.synthetic_samples(
            args.split, args.images, args.seed, args.kind, args.image_size
        )
        kind, source = args.kind, f"synthetic:seed={args.seed}"
    progress = tqdm(samples, desc=f"shards {args.split}", unit="img", mininterval=2.0)
    index = write_shards(progress, args.out, args.split, kind, source, args.shard_size)
    if counter.dropped:
        index.dropped = counter.dropped
        index.save(args.out)
    log.info(
        "%s: %d samples in %d shards, %d dropped",
        args.out,
        index.num_samples,
        len(index.shards),
        index.dropped,
    )
    return index
