"""Shards read from real servers: nginx (HTTP), moto's S3 server through s3fs, `pipe:`
commands. The same samples as from the local files, a dropped connection retried at the byte
reached and counted, a dead source skipped and counted, sample counts without downloading."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from remote_servers import NGINX, S3_ENV, DroppingProxy, nginx, s3_server

from setdiv.data import remote
from setdiv.data.convert import synthetic_samples
from setdiv.data.reader import EvalReader, SampleOptions, ShardSet
from setdiv.data.remote import RETRIES, Retry
from setdiv.data.shards import read_shard, write_shards
from setdiv.data.text import Tokenizer
from setdiv.data.vocab import SPECIALS, Vocab
from setdiv.data.web_shards import count_img2dataset

CC12M = Path(__file__).parents[2] / "shared/data/cc12m_img2dataset_32/cc12m-train-0000.tar"
needs_nginx = pytest.mark.skipif(NGINX is None, reason="no nginx (apt-get install nginx-light)")
pytestmark = pytest.mark.timeout(300)
QUICK = Retry(retries=2, backoff_s=0.0)


def tokenizer() -> Tokenizer:
    vocab = Vocab.build(c for s in synthetic_samples("test", 40, 0) for c in s.captions)
    return Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic region samples in 3 setdiv shards (16, 16, 8) with their index."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(synthetic_samples("test", 40, 0), root, "test", "regions", "synthetic", 16)
    return root


def batches(pattern: str, retry: Retry = QUICK) -> list:
    opts = SampleOptions("regions", tokenizer(), False, retry=retry)
    reader = EvalReader(pattern, opts, batch_size=6)
    return [*reader, reader.skipped]


def same_batches(got: list, want: list) -> None:
    assert len(got) == len(want) and got[-1] == want[-1]
    for a, b in zip(got[:-1], want[:-1], strict=True):
        assert a.image_ids == b.image_ids and a.captions == b.captions
        assert np.array_equal(a.images.numpy(), b.images.numpy())
        assert np.array_equal(a.tokens.numpy(), b.tokens.numpy())


@needs_nginx
def test_http_shards_read_as_the_local_files_with_braces_and_globs(
    shards: Path, tmp_path: Path
) -> None:
    local = batches(f"{shards}/test-{{000000..000002}}.tar")
    with nginx(shards, tmp_path / "nginx") as (url, _):
        assert ShardSet.expand(f"{url}/test-*.tar") == [
            f"{url}/test-00000{i}.tar" for i in range(3)
        ]  # (nginx's directory listing, through fsspec)
        same_batches(batches(f"{url}/test-{{000000..000002}}.tar"), local)
        same_batches(batches(f"{url}/test-*.tar"), local)
        with pytest.raises(FileNotFoundError, match="shard index not found"):
            ShardSet.resolve(f"{url}/nothing-000000.tar")


@needs_nginx
@pytest.mark.skipif(not CC12M.is_file(), reason=f"the real CC12M sample is absent ({CC12M})")
def test_a_dropped_connection_costs_a_retry_at_the_byte_reached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP reads in range requests of `remote.BUFFER` (+ a 4 KB fsspec block) over one
    keep-alive connection, which the proxy resets 600 kB in: the stream reopens at the byte
    the reader had reached (512 KiB), the samples are those of the file, one retry counted."""
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "http", {"block_size": 4096})
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(CC12M, served / CC12M.name)
    with nginx(served, tmp_path / "nginx") as (url, log):
        proxy = DroppingProxy(int(url.rsplit(":", 1)[1]), after=600_000)
        try:
            before = RETRIES.count
            with caplog.at_level(logging.WARNING, "setdiv.data.remote"):
                got = list(read_shard(f"http://127.0.0.1:{proxy.port}/{CC12M.name}", _raise, QUICK))
        finally:
            proxy.close()
        assert proxy.dropped == 1 and RETRIES.count == before + 1
        assert f"at byte {2 * remote.BUFFER} " in caplog.text and "retry 1 of 2" in caplog.text
        requests = [line for line in log.read_text().splitlines() if '"GET ' in line]
        assert len(requests) == -(-CC12M.stat().st_size // (remote.BUFFER + 4096)) + 1
    want = list(read_shard(CC12M, _raise))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in want] and len(want) == 32
    assert all(
        a["jpg"] == b["jpg"] and a["txt"] == b["txt"] for a, b in zip(got, want, strict=True)
    )


def _raise(exc: Exception) -> bool:
    raise exc


@needs_nginx
def test_a_source_that_keeps_failing_is_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    """Every connection is dropped: after `retries` the shard's remaining samples are counted
    as skipped (as for a truncated tar) and the next shard is tried; no crash."""
    with nginx(shards, tmp_path / "nginx") as (url, _):
        proxy = DroppingProxy(int(url.rsplit(":", 1)[1]), after=9000, drops=1000)
        try:
            got = batches(f"http://127.0.0.1:{proxy.port}/test-{{000000..000002}}.tar")
        finally:
            proxy.close()
    ids = [i for b in got[:-1] for i in b.image_ids]
    assert proxy.dropped == 3 * (QUICK.retries + 1)  # (each shard: the read and its retries)
    assert ids == [] and got[-1] == 40  # (each shard is one range request, cut every time)


def test_pipe_commands_read_shards_and_their_index_through_the_command(shards: Path) -> None:
    """`pipe:cat DIR/test-000001.tar`: the index is read by the same command with the shard's
    name replaced; a command that fails is retried, then its samples counted as skipped."""
    local = batches(f"{shards}/test-{{000000..000002}}.tar")
    same_batches(batches(f"pipe:cat {shards}/test-{{000000..000002}}.tar"), local)
    assert remote.sibling(f"pipe:cat {shards}/test-000001.tar", "test-index.json") == (
        f"pipe:cat {shards}/test-index.json"
    )
    flaky = shards.parent / "flaky"
    flaky.mkdir(exist_ok=True)
    shutil.copy(shards / "test-index.json", flaky / "test-index.json")
    for name in ("test-000000.tar", "test-000002.tar"):
        shutil.copy(shards / name, flaky / name)  # (test-000001.tar is missing: cat fails)
    before = RETRIES.count
    got = batches(f"pipe:cat {flaky}/test-{{000000..000002}}.tar")
    assert got[-1] == 16 and RETRIES.count == before + QUICK.retries
    assert [i for b in got[:-1] for i in b.image_ids] == [
        i for b in local[:-1] for i in b.image_ids if i not in _ids(shards / "test-000001.tar")
    ]


def _ids(shard: Path) -> set[str]:
    return {s["__key__"] for s in read_shard(shard, _raise)}


@needs_nginx
@pytest.mark.skipif(not CC12M.is_file(), reason=f"the real CC12M sample is absent ({CC12M})")
def test_img2dataset_counts_come_from_stats_json_without_reading_the_shard(tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(CC12M, served / CC12M.name)
    with nginx(served, tmp_path / "nginx") as (url, log):
        # no _stats.json: the tar's headers are streamed and counted
        assert count_img2dataset(f"{url}/{CC12M.name}") == 32
        (served / "cc12m-train-0000_stats.json").write_text(json.dumps({"successes": 32}))
        log.write_text("")
        shard = ShardSet.resolve(f"{url}/{CC12M.name}", "image", "auto")
        assert shard.format == "img2dataset" and shard.num_samples == 32
        assert CC12M.name not in log.read_text()  # (counted, detected: the tar never fetched)


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs)")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with s3_server(tmp_path / "moto") as endpoint:
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        yield endpoint


def test_s3_shards_through_s3fs_equal_the_local_files(shards: Path, s3: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("shards")
    fs.put([str(p) for p in sorted(shards.iterdir())], "shards/data/")
    local = batches(f"{shards}/test-{{000000..000002}}.tar")
    same_batches(batches("s3://shards/data/test-{000000..000002}.tar"), local)
    same_batches(batches("s3://shards/data/test-*.tar"), local)


@needs_nginx
def test_index_build_and_vocab_read_http_shards_as_local_ones(shards: Path, tmp_path: Path) -> None:
    """`setdiv index build` and `setdiv vocab` over the shards served by nginx: the same index
    (elements bitwise, items) and the same vocabulary as from the files."""
    from run_helpers import run_setdiv
    from test_index import make_export

    from setdiv.index.store import SetIndexStore

    Vocab.build(c for s in synthetic_samples("train", 300, 0) for c in s.captions).save(
        tmp_path / "vocab.json"
    )
    export = make_export(tmp_path, 0)
    build = ["index", "build", str(export), "--modality", "image", "--batch-size", "8"]
    pattern = "test-{000000..000002}.tar"
    local = run_setdiv(*build, "--data", f"{shards}/{pattern}", "--out", str(tmp_path / "a"))
    assert local.returncode == 0, local.stderr[-2000:]
    vocab = ["vocab", "--min-count", "1", "--shards"]
    assert (
        run_setdiv(*vocab, f"{shards}/{pattern}", "--out", str(tmp_path / "v1.json")).returncode
        == 0
    )
    with nginx(shards, tmp_path / "nginx") as (url, _):
        served = run_setdiv(*build, "--data", f"{url}/{pattern}", "--out", str(tmp_path / "b"))
        assert served.returncode == 0, served.stderr[-2000:]
        got = run_setdiv(*vocab, f"{url}/{pattern}", "--out", str(tmp_path / "v2.json"))
        assert got.returncode == 0, got.stderr[-2000:]
    a, b = SetIndexStore.open(tmp_path / "a"), SetIndexStore.open(tmp_path / "b")
    assert len(a) == 40 and a.items == b.items
    assert np.array_equal(a.elements().numpy(), b.elements().numpy())
    assert (tmp_path / "v1.json").read_text() == (tmp_path / "v2.json").read_text()
