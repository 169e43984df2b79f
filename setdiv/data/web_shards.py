"""img2dataset shards (CC3M, CC12M, LAION, DataComp, as img2dataset writes them), read in
place: `KEY.jpg`, `KEY.txt` (one caption), `KEY.json` (metadata with a `status`), and next to
each shard `{shard}_stats.json` with its "successes". No index and no checksums: sample counts
come from the stats file or the tar headers."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path
from typing import Any

from setdiv.data import remote
from setdiv.data.remote import DEFAULT_RETRY, Retry
from setdiv.errors import UserError

__all__ = ["count_img2dataset", "first_members", "scan_img2dataset", "stats_path", "web_meta"]

log = logging.getLogger(__name__)


def count_img2dataset(path: str, retry: Retry = DEFAULT_RETRY) -> int:
    """An img2dataset shard's sample count: from its tar headers when local (`scan_img2dataset`);
    when remote, from img2dataset's `_stats.json` next to it ("successes": the samples it
    wrote) without downloading the shard, else from the tar headers, streamed."""
    if remote.is_remote(path):
        stats = stats_path(path)
        try:
            count = json.loads(remote.read_bytes(stats, retry))["successes"]
            if isinstance(count, int) and count >= 0:
                return count
            log.warning("%s: 'successes' is not a count (%r): counting the tar", stats, count)
        except (OSError, UserError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: no sample count (%s): streaming the tar's headers", stats, exc)
    return scan_img2dataset(path, retry)


def scan_img2dataset(path: str | Path, retry: Retry = DEFAULT_RETRY) -> int:
    """A shard's sample count from its tar headers (webdataset's grouping: members sharing the
    name before the first dot of their file name form one sample). An unreadable tar counts
    what could be read; the reader then skips and counts the rest."""
    keys, last = 0, None
    try:
        with remote.open_tar(path, retry) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, _, name = member.name.rpartition("/")
                key = f"{head}/{name.split('.', 1)[0]}"
                if key != last:
                    keys, last = keys + 1, key
    except (OSError, tarfile.TarError, EOFError) as exc:
        log.warning("%s: unreadable after %d samples (%s)", path, keys, exc)
    return keys


def first_members(path: str, retry: Retry, look: int = 16) -> list[str]:
    """The names of the first `look` file members of a tar (none if unreadable)."""
    names: list[str] = []
    try:
        with remote.open_tar(path, retry) as tar:
            for member in tar:
                if member.isfile():
                    names.append(member.name)
                if len(names) >= look:
                    break
    except (OSError, tarfile.TarError, EOFError):
        pass
    return names


def stats_path(path: str) -> str:
    return remote.sibling(path, remote.name(path).removesuffix(".tar") + "_stats.json")


def web_meta(raw: dict[str, Any], caption_key: str | None = None) -> dict[str, Any]:
    """The meta of an img2dataset sample: its one caption (from `.txt`, or the `.json` field
    `caption_key`), id = key; raises for a failed download, a missing or empty caption, or an
    image that is missing or not a JPEG."""
    info = json.loads(raw["json"]) if "json" in raw else {}
    if not isinstance(info, dict):
        raise ValueError("its .json is not an object")
    if info.get("status", "success") != "success":
        raise ValueError(f"download status {info.get('status')!r}")
    if caption_key is not None:
        caption = info.get(caption_key)
        if not isinstance(caption, str):
            raise ValueError(f"no caption string in .json field {caption_key!r}")
    elif "txt" in raw:
        caption = raw["txt"].decode("utf-8")
    else:
        raise ValueError("no .txt caption")
    if not caption.strip():
        raise ValueError("an empty caption")
    if raw.get("jpg", b"")[:3] != b"\xff\xd8\xff":
        raise ValueError("no JPEG image (.jpg missing or not JPEG data)")
    key = raw["__key__"]
    return {"image_id": key, "captions": [caption.strip()], "caption_ids": [key]}
