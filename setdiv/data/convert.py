"""Sources -> `Sample` streams: SCAN precomputed features, Karpathy JSON + JPEGs, synthetic.

Each `*_samples` function yields samples lazily (memory does not grow with the dataset) and
records images it drops in `DropCounter`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from setdiv.data import synthetic
from setdiv.data.shards import CAPTIONS_PER_IMAGE, Sample
from setdiv.errors import UserError

__all__ = ["DropCounter", "karpathy_samples", "precomp_samples", "synthetic_samples"]

log = logging.getLogger(__name__)


@dataclass
class DropCounter:
    dropped: int = 0


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"missing SCAN file: {path}")
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def precomp_samples(root: str | Path, split: str, dtype: str = "float16") -> Iterator[Sample]:
    """SCAN precomputed BUTD features: `{split}_ims.npy` (N,36,2048), `{split}_caps.txt` (5N
    lines), `{split}_ids.txt` (one id per image or per caption).

    The npy is memory-mapped and read one image at a time. Caption ids are line numbers in
    `{split}_caps.txt` (SCAN ships no COCO caption ids).
    """
    root = Path(root)
    ims_path = root / f"{split}_ims.npy"
    if not ims_path.is_file():
        raise FileNotFoundError(f"missing SCAN file: {ims_path}")
    ims = np.load(ims_path, mmap_mode="r")
    caps = _read_lines(root / f"{split}_caps.txt")
    ids_path = root / f"{split}_ids.txt"
    ids = _read_lines(ids_path) if ids_path.is_file() else [str(i) for i in range(len(ims))]
    n = ims.shape[0]
    if len(ids) == CAPTIONS_PER_IMAGE * n:
        ids = ids[::CAPTIONS_PER_IMAGE]
    if len(ids) != n:
        raise UserError(
            f"{ids_path}: {len(ids)} ids for {n} images (need one per image or per caption)"
        )
    if len(caps) < CAPTIONS_PER_IMAGE * n:
        short = len(caps) // CAPTIONS_PER_IMAGE
        raise UserError(
            f"{root / f'{split}_caps.txt'}: image {ids[short].strip()} (row {short}) has "
            f"{len(caps) - CAPTIONS_PER_IMAGE * short} captions, need 5"
        )
    if len(caps) > CAPTIONS_PER_IMAGE * n:
        raise UserError(f"{split}_caps.txt has {len(caps)} lines for {n} images: layout mismatch")
    for i in range(n):
        c0 = CAPTIONS_PER_IMAGE * i
        yield Sample(
            image_id=ids[i].strip(),
            captions=[c.strip() for c in caps[c0 : c0 + CAPTIONS_PER_IMAGE]],
            caption_ids=list(range(c0, c0 + CAPTIONS_PER_IMAGE)),
            regions=np.asarray(ims[i], dtype=dtype),
        )


_KARPATHY_SPLITS = {"train": ("train",), "val": ("val",), "test": ("test",)}


def karpathy_samples(
    json_path: str | Path,
    images_root: str | Path,
    split: str,
    restval: bool = False,
    drop_short: bool = False,
    counter: DropCounter | None = None,
) -> Iterator[Sample]:
    """Karpathy split JSON (`dataset_coco.json` / `dataset_flickr30k.json`) + image files.

    Images are stored as their original JPEG bytes. Keeps the first 5 sentences; an image with
    fewer fails naming its id, or with `drop_short` is dropped and counted.
    """
    json_path, images_root = Path(json_path), Path(images_root)
    if split not in _KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {sorted(_KARPATHY_SPLITS)}, got {split!r}")
    wanted = set(_KARPATHY_SPLITS[split]) | ({"restval"} if restval and split == "train" else set())
    data = json.loads(json_path.read_text())
    for img in data["images"]:
        if img["split"] not in wanted:
            continue
        image_id = str(img.get("cocoid", img.get("imgid", img["filename"])))
        sentences = img["sentences"]
        if len(sentences) < CAPTIONS_PER_IMAGE:
            if not drop_short:
                raise UserError(
                    f"{json_path}: image {image_id} has {len(sentences)} captions, need 5 "
                    "(pass --min-captions to drop such images)"
                )
            if counter is not None:
                counter.dropped += 1
            log.warning("dropping image %s: %d captions", image_id, len(sentences))
            continue
        path = images_root / img.get("filepath", "") / img["filename"]
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id}: file not found: {path}")
        first = sentences[:CAPTIONS_PER_IMAGE]
        yield Sample(
            image_id=image_id,
            captions=[s["raw"].strip() for s in first],
            caption_ids=[s.get("sentid", k) for k, s in enumerate(first)],
            jpg=path.read_bytes(),
        )


def synthetic_samples(
    split: str,
    num_images: int,
    seed: int,
    kind: str = "regions",
    image_size: int = 64,
    picture: bool = False,
) -> Iterator[Sample]:
    """The built-in ambiguous dataset (`setdiv.data.synthetic`), rendered as regions or JPEGs
    (`picture`: region samples carry the scene's JPEG too, for people to look at)."""
    if kind not in ("regions", "image"):
        raise ValueError(f"synthetic kind must be 'regions' or 'image', got {kind!r}")
    for i in range(num_images):
        scene = synthetic.make_scene(seed, i, split)
        yield Sample(
            image_id=f"{split}{i:07d}",
            captions=list(scene.captions),
            caption_ids=[CAPTIONS_PER_IMAGE * i + k for k in range(CAPTIONS_PER_IMAGE)],
            jpg=synthetic.render_image(scene, image_size) if kind == "image" or picture else None,
            regions=synthetic.render_regions(scene) if kind == "regions" else None,
        )
