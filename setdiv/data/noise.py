"""Noisy pairs for the robustness benchmark (`data.caption_noise`, docs/objectives.md): a
seeded share of the training captions replaced by captions of other images, as the
noisy-correspondence benchmarks shuffle 20% / 50% of Flickr30K's and COCO's pairs.

The plan is made once, before training, from the captions of every training shard (read from
the tar headers and caption members only: images are skipped, not read), so the same captions
are wrong in every epoch, on every rank and data worker, and after a resume. Which captions,
and by which they are replaced, depends only on the seed and the shards' contents. Validation
and evaluation never see it.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from setdiv.data import remote
from setdiv.errors import UserError

__all__ = ["CaptionNoise", "plan_caption_noise", "shard_captions"]

log = logging.getLogger(__name__)


def _split_member(name: str) -> tuple[str, str]:
    """A tar member name -> (sample key, extension), as webdataset groups members: the name up
    to the first dot of its file name is the key."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _captions(ext: str, data: bytes, fmt: str, caption_key: str | None) -> list[str] | None:
    """The captions a member holds in a shard of format `fmt`, or None (not a caption member,
    or one that does not parse: training skips such samples anyway)."""
    try:
        if fmt == "img2dataset":
            if caption_key is None:
                return [data.decode("utf-8").strip()] if ext == "txt" else None
            if ext != "json":
                return None
            caption = json.loads(data).get(caption_key)
            return [caption.strip()] if isinstance(caption, str) else None
        if ext != "json":
            return None
        captions = json.loads(data)["captions"]
        return [str(c) for c in captions]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def shard_captions(
    url: str, fmt: str, caption_key: str | None = None
) -> Iterator[tuple[str, list[str]]]:
    """(key, captions) of each sample of one shard with readable, non-empty captions. Only
    caption members are read; an unreadable tail ends the shard (the reader skips it too)."""
    try:
        with remote.open_tar(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                if ext not in ("json", "txt"):
                    continue
                f = tar.extractfile(member)
                captions = _captions(ext, f.read() if f else b"", fmt, caption_key)
                if captions and all(c.strip() for c in captions):
                    yield key, captions
    except (OSError, tarfile.TarError, EOFError) as exc:
        log.warning("%s: caption scan stopped early (%s)", url, exc)


@dataclass(frozen=True)
class CaptionNoise:
    """The replaced captions: (shard url, sample key) -> {caption index: replacement}."""

    replacements: dict[tuple[str, str], dict[int, str]]
    total: int
    """Training captions the plan was drawn from."""
    replaced: int
    """Of those, how many are replaced."""

    def apply(self, url: str, key: str, captions: list[str]) -> list[str]:
        """A sample's captions with its replaced ones swapped in."""
        mine = self.replacements.get((url, key))
        if not mine:
            return captions
        return [mine.get(j, c) for j, c in enumerate(captions)]


def plan_caption_noise(
    urls: list[str], fmt: str, fraction: float, seed: int, caption_key: str | None = None
) -> CaptionNoise:
    """Replace round(fraction x captions) of the shards' captions, chosen with `seed`, each by
    a caption (drawn with `seed`) of another image."""
    owners: list[tuple[str, str]] = []  # per caption: its sample
    texts: list[str] = []
    index: list[int] = []  # per caption: its position in its sample
    for url in sorted(set(urls)):
        for key, captions in shard_captions(url, fmt, caption_key):
            owners += [(url, key)] * len(captions)
            texts += captions
            index += range(len(captions))
    total = len(texts)
    if len({o for o in owners}) < 2:
        raise UserError(
            f"config key 'data.caption_noise': the training shards hold {total} readable "
            "caption(s) of fewer than 2 images: no other image's caption to swap in"
        )
    rng = np.random.default_rng([seed, 0x6E6F697365])  # "noise"
    chosen = np.sort(rng.choice(total, size=round(fraction * total), replace=False))
    replacements: dict[tuple[str, str], dict[int, str]] = {}
    for c in chosen.tolist():
        donor = int(rng.integers(total))
        while owners[donor] == owners[c]:  # another image's caption (>= 2 images: ends)
            donor = int(rng.integers(total))
        replacements.setdefault(owners[c], {})[index[c]] = texts[donor]
    return CaptionNoise(replacements, total, len(chosen))
