"""What `setdiv serve` runs behind HTTP: query images decoded safely (outside the model, within
pixel budgets), queries from concurrent requests batched through the model by one thread, and
thumbnails of gallery pictures.

Shape legend: Q queries, L query set size, D width.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import math
import queue
import tarfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from setdiv.data.samples import SampleOptions, image_file_pixels, sample_options
from setdiv.errors import UserError
from setdiv.index.search import Hits, SetSearcher
from setdiv.model.encoders import image_input_kind

__all__ = [
    "MAX_PIXELS",
    "DecodeBusyError",
    "Service",
    "TooManyPixelsError",
    "decode_query_image",
    "thumbnail",
]

log = logging.getLogger(__name__)

FORMATS = ("JPEG", "PNG", "WEBP")
"""The only image formats decoded (Pillow never sees EPS, PSD, ...)."""
MAX_PIXELS = 32_000_000
"""Largest query image (pixels): a 32-megapixel photo. The model reads `data.image_size`
squared (224..512 square) pixels of it, so no query needs more; a decompression bomb of
11000 x 11000 is refused before decoding."""
MAX_REQUEST_PIXELS = 2 * MAX_PIXELS
"""Most pixels of one request's images together (two of the largest photos, or eight of 8
megapixels); a request over it is refused from the image headers, before any decoding (413)."""
LARGE_IMAGE = 4_000_000
"""Query images of more pixels are decoded one at a time per server process, in a lane of
their own; smaller ones one at a time in another lane. So decoding holds at most
`MAX_DECODING_PIXELS` (~150 MB at 4 bytes a pixel) and two cores whatever the load, and a
small query never queues behind a large one. An image waits for its lane until its
request's deadline (then 503)."""
MAX_DECODING_PIXELS = MAX_PIXELS + LARGE_IMAGE
"""Most pixels being decoded at once in a server process (the two lanes)."""
THUMB = 160
"""Longest side of a served thumbnail (pixels)."""
MAX_BATCH = 256
"""Most queries the model thread encodes in one call."""
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError)
"""What Pillow raises for a damaged file at decode time (a truncated JPEG: OSError)."""


class TooManyPixelsError(UserError):
    """A request's images hold more than `MAX_REQUEST_PIXELS` together (HTTP 413)."""


class DecodeBusyError(RuntimeError):
    """An image's decoding lane did not reach it before the request's deadline (HTTP 503)."""


def _open_checked(data: bytes) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except (OSError, Image.DecompressionBombError) as exc:
        raise UserError(f"not a JPEG, PNG or WebP image ({exc})") from None
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise UserError(f"{w}x{h} pixels is over the limit of {MAX_PIXELS} pixels")
    return im


def image_pixels(data: bytes) -> int:
    """Width x height of an encoded image, read from its header alone (UserError for a format
    other than JPEG / PNG / WebP, or more than `MAX_PIXELS`)."""
    with _open_checked(data) as im:
        return im.size[0] * im.size[1]


def decode_query_image(
    data: bytes, size: int, style: str, opts: SampleOptions | None = None
) -> Tensor:
    """(1, 3, size, size) normalised pixels of an encoded JPEG / PNG / WebP query image, with
    its header checked (format, pixel count) before any decoding; JPEGs are decoded at the
    smallest scale that still covers `size`, larger images box-filtered to a shorter side of 2 x
    `size` before the transform. A damaged body (a truncated JPEG) is a UserError.
    `opts`: the export's data options (tower normalisation and interpolation)."""
    with _open_checked(data) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size * 2, size * 2))
        try:
            base = im if im.mode in ("RGB", "L") else im.convert("RGB")
            scale = min(base.size) / (2 * size)  # shrunk before any copy of the full image
            if scale >= 2:  # (a box filter of the exact scale: reduce() would shift the grid)
                w, h = base.size
                base = base.resize((round(w / scale), round(h / scale)), Image.Resampling.BOX)
            rgb = base.convert("RGB")
        except DECODE_ERRORS as exc:
            raise UserError(f"a damaged {im.format} image ({exc})") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=0)
    return image_file_pixels(io.BytesIO(buf.getvalue()), size, style, opts)


def thumbnail(data: bytes, size: int = THUMB) -> bytes:
    """JPEG bytes of `data` (a picture) shrunk to at most `size` on its longer side."""
    with _open_checked(data) as im:
        im.draft("RGB", (size, size))
        try:
            rgb = im.convert("RGB")
        except DECODE_ERRORS as exc:
            raise UserError(f"a damaged {im.format} picture ({exc})") from None
    rgb.thumbnail((size, size))
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=85)
    return out.getvalue()


@dataclass
class _Job:
    kind: str
    """text | image"""
    queries: list[str] | Tensor
    k: int
    candidates: int | str
    future: concurrent.futures.Future


class Service:
    """The searcher behind the API. One thread runs the model: it takes every waiting job,
    encodes their queries in one call per kind, searches them together per (k, candidates)
    and answers each job, so throughput grows with concurrent clients."""

    def __init__(self, searcher: SetSearcher, max_batch: int = MAX_BATCH) -> None:
        self.searcher, self.max_batch = searcher, max_batch
        self.items = searcher.store.items  # read (and checked) before the first request
        self._by_id = {str(item["id"]): n for n, item in enumerate(self.items)}
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._members: dict[str, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()
        self._lanes = [ThreadPoolExecutor(1, f"setdiv-decode-{n}") for n in ("small", "large")]
        self._thread = threading.Thread(target=self._run, name="setdiv-model", daemon=True)
        self._thread.start()

    @property
    def modality(self) -> str:
        return self.searcher.modality

    def health(self) -> dict[str, Any]:
        meta = self.searcher.store.meta
        return {
            "status": "ok",
            "items": len(self.items),
            "modality": meta.modality,
            "export_sha256": meta.export_sha256,
            "ann": meta.ann.factory(),
            "pictures": any("picture" in item for item in self.items[:100]),
            "threads": torch.get_num_threads(),
        }

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
        for lane in self._lanes:
            lane.shutdown(wait=False, cancel_futures=True)

    # --- queries --------------------------------------------------------------------------------

    def image_kind(self) -> str:
        return image_input_kind(self.searcher.exported.cfg.model.image.name)

    def decode_images(self, blobs: list[bytes], deadline: float = math.inf) -> Tensor:
        """(Q, 3, S, S) model-ready pixels of encoded query images. Every header is checked
        first (UserError naming the image; TooManyPixelsError over `MAX_REQUEST_PIXELS`), then
        the images are decoded in their lanes (`LARGE_IMAGE`); DecodeBusyError if one is not
        decoded by `deadline` (time.monotonic()), its lane busy with other requests."""
        cfg = self.searcher.exported.cfg
        if self.image_kind() != "image":
            raise UserError(
                f"this index's model ({cfg.model.image.name}) reads region features, not images"
            )
        sizes = [_named(i, image_pixels, blob) for i, blob in enumerate(blobs)]
        if sum(sizes) > MAX_REQUEST_PIXELS:
            raise TooManyPixelsError(
                f"{len(blobs)} image(s) of {sum(sizes)} pixels in all: a request may carry at "
                f"most {MAX_REQUEST_PIXELS} pixels"
            )
        opts = sample_options(cfg.data, "image", None, train=False, augment=False)  # type: ignore[arg-type]
        args = (cfg.data.image_size, cfg.data.image_transform, opts)
        futures = [
            self._lanes[n > LARGE_IMAGE].submit(_named, i, decode_query_image, blob, *args)
            for i, (blob, n) in enumerate(zip(blobs, sizes, strict=True))
        ]
        try:
            left = None if deadline == math.inf else max(deadline - time.monotonic(), 0.0)
            _, late = concurrent.futures.wait(futures, left, FIRST_EXCEPTION)
            for f in futures:  # the first damaged image, in request order
                if f.done() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            if late:
                raise DecodeBusyError(
                    f"busy: {len(late)} image(s) not decoded within the request deadline (a "
                    "server process decodes one large and one small image at a time)"
                )
            return torch.cat([f.result() for f in futures])
        finally:
            for f in futures:  # not started: never will be
                f.cancel()

    def submit(
        self, kind: str, queries: list[str] | Tensor, k: int, candidates: int | str
    ) -> concurrent.futures.Future:
        """Queue a search; the future gets its `Hits` (or the UserError it caused)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put(_Job(kind, queries, k, candidates, future))
        return future

    def describe(self, hits: Hits, q: int) -> list[dict[str, Any]]:
        """Query `q`'s hits as records, with a picture URL for items that have one."""
        out = []
        for record in self.searcher.describe(hits, q):
            picture = record.pop("picture", None)
            if picture is not None:
                record["picture"] = f"/image/at/{record['index']}"
            out.append(record)
        return out

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch, size = [job], len(job.queries)
            while size < self.max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                batch.append(nxt)
                size += len(nxt.queries)
            try:
                self._answer(batch)
            except Exception as exc:  # answered per job below, nothing is left waiting
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)

    @torch.no_grad()
    def _answer(self, batch: list[_Job]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        sets: dict[int, Tensor] = {}
        for kind in ("text", "image"):
            jobs = [j for j in live if j.kind == kind]
            if not jobs:
                continue
            try:
                encoded = self._encode(kind, jobs)
            except UserError:  # find the job at fault, answer the others
                encoded = None
            for j, s in zip(jobs, encoded or [None] * len(jobs), strict=True):
                if s is None:
                    try:
                        s = self._encode(kind, [j])[0]
                    except UserError as exc:
                        j.future.set_exception(exc)
                        continue
                sets[id(j)] = s
        groups: dict[tuple, list[_Job]] = {}
        for j in live:
            if id(j) in sets:
                groups.setdefault((j.k, j.candidates), []).append(j)
        for (k, candidates), jobs in groups.items():
            hits = self.searcher.search(torch.cat([sets[id(j)] for j in jobs]), k, candidates)
            start = 0
            for j in jobs:
                n = len(j.queries)
                j.future.set_result(_slice(hits, start, start + n))
                start += n

    def _encode(self, kind: str, jobs: list[_Job]) -> list[Tensor]:
        if kind == "text":
            texts = [t for j in jobs for t in j.queries]
            out = self.searcher.encode_texts(texts)  # type: ignore[arg-type]
        else:
            out = self.searcher.encode_images(torch.cat([j.queries for j in jobs]))  # type: ignore[misc]
        sizes = [len(j.queries) for j in jobs]
        return list(out.split(sizes))

    # --- pictures -------------------------------------------------------------------------------

    def picture(self, item: str) -> bytes:
        """A JPEG thumbnail of the gallery item whose id (as text) is `item`; LookupError when
        there is no such item or it has no picture. Never read as a position."""
        n = self._by_id.get(item)
        if n is None:
            shown = item if len(item) <= 64 else item[:64] + "..."
            raise LookupError(f"no item with the id {shown!r} in this index")
        return self.picture_at(n)

    def picture_at(self, n: int) -> bytes:
        """A JPEG thumbnail of the gallery item at position `n` (0-based, as `index` in hits);
        LookupError when there is none or it has no picture."""
        if not 0 <= n < len(self.items):
            raise LookupError(f"no item at position {n} (this index holds {len(self.items)})")
        with self._lock:
            if n in self._thumbs:
                self._thumbs.move_to_end(n)
                return self._thumbs[n]
        where = self.items[n].get("picture")
        if where is None:
            why = "a text gallery" if self.modality == "text" else "no picture in its shards"
            raise LookupError(f"item {self.items[n]['id']!r} has no picture ({why})")
        data = self._read_member(Path(where["shard"]), where["member"])
        try:
            thumb = thumbnail(data)
        except UserError as exc:
            raise LookupError(f"item {self.items[n]['id']!r}: {exc}") from None
        with self._lock:
            self._thumbs[n] = thumb
            if len(self._thumbs) > 4096:
                self._thumbs.popitem(last=False)
        return thumb

    def _read_member(self, shard: Path, member: str) -> bytes:
        key = str(shard)
        if key not in self._members:
            try:
                with tarfile.open(shard) as tar:
                    members = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
            except (OSError, tarfile.TarError) as exc:
                raise LookupError(f"{shard}: not readable ({exc})") from None
            with self._lock:
                self._members[key] = members
        if member not in self._members[key]:
            raise LookupError(f"{shard} holds no {member}")
        offset, size = self._members[key][member]
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)


def _named(i: int, fn: Any, *args: Any) -> Any:
    """`fn(*args)`, its UserError naming query image `i`."""
    try:
        return fn(*args)
    except UserError as exc:
        raise UserError(f"image {i}: {exc}") from None


def _slice(hits: Hits, a: int, b: int) -> Hits:
    rounds = hits.rounds[a:b] if hits.rounds is not None else None
    return Hits(hits.scores[a:b], hits.items[a:b], hits.candidates[a:b], rounds)
