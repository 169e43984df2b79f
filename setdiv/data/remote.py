"""Shard locations that are not local files: `https://` / `http://` and any other fsspec URL
(`s3://` through s3fs), and `pipe:CMD` (a shell command writing the shard to its stdout, as
webdataset and open_clip spell it, e.g. `pipe:aws s3 cp s3://bucket/train-0001.tar -`).

A remote shard is read as a stream that survives transient failures: when a read or an open
fails (a dropped connection, a timeout, a 5xx, a command exiting non-zero), the stream waits
(`backoff_s`, doubling) and reopens at the byte it had reached, up to `retries` times; each
retry is warned about and counted. After the last one the error reaches the reader, which
skips and counts the shard's remaining samples as it does for a truncated local tar. A
missing file or a refused permission is not retried.

Files next to a shard (its `{split}-index.json`, img2dataset's `_stats.json`) are found by
replacing the last path component of the URL; for `pipe:` the command's one argument ending
in `.tar` is replaced, and the command is run with it. docs/data.md "Shards on HTTP, S3 or a
command".
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import re
import shlex
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from setdiv.errors import UserError

__all__ = [
    "DEFAULT_RETRY",
    "RETRIES",
    "Retry",
    "RetryingStream",
    "exists",
    "expand_part",
    "is_remote",
    "name",
    "open_stream",
    "open_tar",
    "read_bytes",
    "sibling",
]

log = logging.getLogger(__name__)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
BUFFER = 256 << 10
"""Bytes a remote stream asks for at a time (HTTP: a range request of this plus fsspec's
block size, unless its read-ahead cache holds them)."""
_FATAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)


@dataclass(frozen=True)
class Retry:
    """How often and how patiently a remote read is retried (`data.retries`,
    `data.retry_backoff_s`)."""

    retries: int = 3
    backoff_s: float = 1.0


class _Counter:
    """The process's retry count (`RETRIES.count`), thread-safe."""

    def __init__(self) -> None:
        self.count, self._lock = 0, threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


DEFAULT_RETRY = Retry()
RETRIES = _Counter()
"""Retries this process made reading remote shards (the readers report the difference)."""


def is_remote(url: str | Path) -> bool:
    """A URL with a scheme other than file://, or a `pipe:` command."""
    text = str(url)
    return text.startswith("pipe:") or (bool(_URL.match(text)) and not text.startswith("file://"))


def _local(url: str | Path) -> str:
    text = str(url)
    return text.removeprefix("file://")


def _pipe_target(command: str) -> tuple[list[str], int]:
    """The command's words and the index of its one word ending in `.tar`."""
    words = shlex.split(command)
    found = [i for i, w in enumerate(words) if w.endswith(".tar")]
    if len(found) != 1:
        raise UserError(
            f"pipe:{command}: name the shard as exactly one argument ending in .tar (found "
            f"{len(found)}); its index and stats files are read through the same command"
        )
    return words, found[0]


def name(url: str | Path) -> str:
    """The shard's file name: the last path component (of the `.tar` argument for `pipe:`)."""
    text = str(url)
    if text.startswith("pipe:"):
        words, i = _pipe_target(text[5:])
        return words[i].rsplit("/", 1)[-1]
    return text.rstrip("/").rsplit("/", 1)[-1] if is_remote(text) else Path(_local(text)).name


def sibling(url: str | Path, other: str) -> str:
    """The location of file `other` in the same folder as `url` (for `pipe:`, the same command
    with its `.tar` argument's file name replaced)."""
    text = str(url)
    if text.startswith("pipe:"):
        words, i = _pipe_target(text[5:])
        head = words[i].rpartition("/")[0]
        words[i] = f"{head}/{other}" if head else other
        return "pipe:" + shlex.join(words)
    if is_remote(text):
        return text.rstrip("/").rpartition("/")[0] + "/" + other
    return str(Path(_local(text)).parent / other)


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UserError(f"{url}: no filesystem for this URL ({exc})") from None


def exists(url: str | Path) -> bool:
    """Whether `url` names a readable file (for `pipe:`, whether the command writes one)."""
    text = str(url)
    if not is_remote(text):
        return Path(_local(text)).is_file()
    if text.startswith("pipe:"):
        try:
            read_bytes(text, Retry(0))
        except (OSError, UserError):
            return False
        return True
    fs, path = _fs(text)
    try:
        return bool(fs.isfile(path))
    except FileNotFoundError:
        return False


def expand_part(part: str) -> list[str]:
    """The files one brace-expanded part names: itself, or the sorted matches of its glob
    characters (locally, or on a filesystem fsspec can list); none matching is an error."""
    if not any(c in part for c in "*?["):
        return [part]
    if part.startswith("pipe:"):
        raise UserError(f"{part!r}: a pipe: command cannot hold glob characters; use braces")
    if not is_remote(part):
        matches = sorted(glob.glob(_local(part)))
    else:
        fs, path = _fs(part)
        protocol = part.split("://", 1)[0]
        matches = [m if _URL.match(m) else f"{protocol}://{m}" for m in sorted(fs.glob(path))]
    if not matches:
        raise FileNotFoundError(f"no shard matches {part!r}")
    return matches


def _open_fsspec(url: str, offset: int) -> IO[bytes]:
    fs, path = _fs(url)
    f = fs.open(path, "rb")
    if offset:
        f.seek(offset)
    return f


class _Pipe(io.RawIOBase):
    """The stdout of `pipe:` command; closing it waits for the command, and a non-zero exit
    status at the end of its output is an error (so a failed download is not a short shard)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)  # noqa: S602

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        assert self.proc.stdout is not None
        n = self.proc.stdout.readinto(b)
        if n == 0 and (code := self.proc.wait()) != 0:
            raise OSError(f"pipe:{self.command} exited with status {code}")
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        super().close()


def _open_pipe(url: str, offset: int) -> IO[bytes]:
    pipe = _Pipe(url[5:])
    while offset > 0:  # (a command's output cannot seek: read up to where the stream was)
        chunk = pipe.read(min(offset, 1 << 20))
        if not chunk:
            raise OSError(f"{url}: ended before byte {offset} on reopening")
        offset -= len(chunk)
    return pipe  # type: ignore[return-value]


class RetryingStream(io.RawIOBase):
    """A remote file read front to back, reopened at the byte reached after a transient
    failure (module docstring)."""

    def __init__(self, url: str, retry: Retry, opener: Callable[[str, int], IO[bytes]]) -> None:
        self.url, self.retry, self.opener = url, retry, opener
        self.pos, self.retries = 0, 0
        self.f: IO[bytes] | None = None
        self._attempt(lambda: None)

    def readable(self) -> bool:
        return True

    def _attempt(self, op: Callable[[], Any]) -> Any:
        for attempt in range(self.retry.retries + 1):
            try:
                if self.f is None:
                    self.f = self.opener(self.url, self.pos)
                return op()
            except _FATAL:
                raise
            except Exception as exc:  # noqa: BLE001 -- any other failure of a remote read is retried
                self._drop()
                if attempt == self.retry.retries:
                    raise OSError(
                        f"{self.url}: failed at byte {self.pos} after {attempt} retries: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                self.retries += 1
                RETRIES.add()
                wait = self.retry.backoff_s * 2**attempt
                log.warning(
                    "%s: %s at byte %d (%s); retry %d of %d in %.1f s", self.url,
                    type(exc).__name__, self.pos, exc, attempt + 1, self.retry.retries, wait,
                )  # fmt: skip
                time.sleep(wait)
        raise AssertionError("unreachable")

    def readinto(self, b: Any) -> int:
        def read() -> int:
            assert self.f is not None
            data = self.f.read(len(b))
            b[: len(data)] = data
            return len(data)

        n = self._attempt(read)
        self.pos += n
        return n

    def _drop(self) -> None:
        if self.f is not None:
            with contextlib.suppress(Exception):
                self.f.close()
            self.f = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str | Path, retry: Retry = DEFAULT_RETRY) -> IO[bytes]:
    """A buffered reader of `url` (a local file is opened as it is; a remote one through a
    `RetryingStream`)."""
    text = str(url)
    if not is_remote(text):
        return open(_local(text), "rb")  # noqa: SIM115 -- the caller closes it
    opener = _open_pipe if text.startswith("pipe:") else _open_fsspec
    return io.BufferedReader(RetryingStream(text, retry, opener), buffer_size=BUFFER)


def read_bytes(url: str | Path, retry: Retry = DEFAULT_RETRY) -> bytes:
    """The whole content of `url`."""
    with open_stream(url, retry) as f:
        return f.read()


@contextlib.contextmanager
def open_tar(url: str | Path, retry: Retry = DEFAULT_RETRY) -> Iterator[tarfile.TarFile]:
    """A tar read in place (local: random access) or as a stream (remote: members in order,
    each readable only when reached)."""
    text = str(url)
    if not is_remote(text):
        with tarfile.open(_local(text), "r:") as tar:
            yield tar
        return
    with open_stream(text, retry) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        yield tar
