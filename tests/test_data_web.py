"""img2dataset shards (`KEY.jpg`, `KEY.txt`, `KEY.json`) read in place: real CC12M pairs, and
the broken samples web data is full of, skipped and counted."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from setdiv.data import samples as samples_mod
from setdiv.data.reader import EvalReader, SampleOptions, ShardSet, TrainReader
from setdiv.data.text import Tokenizer
from setdiv.data.vocab import SPECIALS, Vocab
from setdiv.data.web_shards import web_meta
from setdiv.errors import UserError

CC12M = Path(__file__).parents[2] / "shared/data/cc12m_img2dataset_32/cc12m-train-0000.tar"


def tokenizer(captions: list[str]) -> Tokenizer:
    vocab = Vocab.build(captions)
    return Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))


def members(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} read with tarfile: the independent view of a shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


@pytest.mark.skipif(not CC12M.is_file(), reason=f"the real CC12M sample is absent ({CC12M})")
def test_real_cc12m_pairs_are_read_in_place() -> None:
    """The 32 real pairs: detected as img2dataset (no index file, no conversion), counted from
    the tar headers, every image decoded with its one caption from `.txt`, in shard order."""
    raw = members(CC12M)
    shards = ShardSet.resolve(str(CC12M), "image", "auto")
    assert shards.format == "img2dataset" and shards.num_samples == len(raw) == 32
    texts = {k: v["txt"].decode().strip() for k, v in raw.items()}
    tok = tokenizer(list(texts.values()))
    reader = EvalReader(str(CC12M), SampleOptions("image", tok, False, 32), batch_size=10)
    batches = list(reader)
    assert reader.skipped == 0 and [len(b.image_ids) for b in batches] == [10, 10, 10, 2]
    ids = [i for b in batches for i in b.image_ids]
    assert ids == list(raw) and all(b.caption_counts == [1] * len(b.image_ids) for b in batches)
    assert [c for b in batches for c in b.captions] == [texts[k] for k in ids]
    assert batches[0].images.shape == (10, 3, 32, 32) and batches[0].tokens.shape[0] == 10
    # Training reads them too: one caption per image, image-major.
    train = TrainReader(
        str(CC12M), SampleOptions("image", tok, True, 32), batch_size=8, num_workers=0,
        shuffle_buffer=0,
    )  # fmt: skip
    got = list(train.epoch(0))
    assert len(got) == 4 and {i for b in got for i in b.image_ids} == set(raw)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "JPEG")
    return buf.getvalue()


def write_web_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "key":
                    continue
                info = tarfile.TarInfo(f"{sample['key'].decode()}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_broken_web_samples_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Missing `.txt`, an empty caption, PNG bytes under `.jpg`, no image, a failed download
    (`status`), a non-object `.json`: each skipped and counted, never a crash; the two good
    samples are read, and a caption can come from a `.json` field instead."""
    # The warner is rate-limited per process: an earlier test's warning must not silence ours.
    monkeypatch.setattr(samples_mod.WARN, "last", -1e9)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    ok = json.dumps({"status": "success", "caption": "a blue sky"}).encode()
    samples = [
        {"key": b"000", "jpg": jpeg((200, 0, 0)), "txt": b"a red square", "json": ok},
        {"key": b"001", "jpg": jpeg((0, 200, 0)), "json": ok},
        {"key": b"002", "jpg": jpeg((0, 0, 200)), "txt": b"  \n", "json": ok},
        {"key": b"003", "jpg": png.getvalue(), "txt": b"a png", "json": ok},
        {"key": b"004", "txt": b"no image at all", "json": ok},
        {"key": b"005", "jpg": jpeg((9, 9, 9)), "txt": b"failed", "json": b'{"status": "failed"}'},
        {"key": b"006", "jpg": jpeg((9, 9, 9)), "txt": b"odd json", "json": b"[1, 2]"},
        {"key": b"007", "jpg": jpeg((0, 0, 0)), "txt": b"a black square"},
    ]
    write_web_shard(tmp_path / "web-0000.tar", samples)
    tok = tokenizer(["a red square", "a black square", "a blue sky"])
    opts = SampleOptions("image", tok, False, 16, format="img2dataset")
    reader = EvalReader(str(tmp_path / "web-0000.tar"), opts, batch_size=4)
    batches = list(reader)
    assert [i for b in batches for i in b.image_ids] == ["000", "007"]
    assert reader.skipped == 6 and sum(b.skipped for b in batches) == 6
    assert [c for b in batches for c in b.captions] == ["a red square", "a black square"]
    assert "skipping corrupt sample '001': ValueError: no .txt caption" in caplog.text
    # Each reason, as the (rate-limited) warnings would name it:
    reasons = {
        "001": "no .txt caption", "002": "an empty caption", "003": "not JPEG",
        "004": "not JPEG", "005": "status 'failed'", "006": "not an object",
    }  # fmt: skip
    for sample in samples:
        key = sample["key"].decode()
        raw = {"__key__": key, **{k: v for k, v in sample.items() if k != "key"}}
        if key in reasons:
            with pytest.raises(ValueError, match=reasons[key]):
                web_meta(raw)
    # The caption from a .json field: samples without it are skipped instead.
    by_json = SampleOptions("image", tok, False, 16, format="img2dataset", caption_key="caption")
    read = [i for b in EvalReader(str(tmp_path / "web-0000.tar"), by_json, 4) for i in b.image_ids]
    assert read == ["000", "001", "002"]
    # A model reading regions cannot read web shards.
    with pytest.raises(UserError, match="img2dataset shards hold images"):
        ShardSet.resolve(str(tmp_path / "web-0000.tar"), "regions", "img2dataset")
    # Training over them: only good samples in batches, the bad ones counted.
    train = TrainReader(
        str(tmp_path / "web-0000.tar"), SampleOptions("image", tok, True, 16),
        batch_size=2, num_workers=0, shuffle_buffer=0,
    )  # fmt: skip
    batch = next(iter(train.epoch(0)))
    assert sorted(batch.image_ids) == ["000", "007"] and batch.skipped == 6
    assert np.isfinite(batch.images.numpy()).all()


def test_weighted_sources_draw_samples_by_weight_and_resume_exactly(tmp_path: Path) -> None:
    """Two sources at weights 3:1, the second with half-size shards: the samples of an epoch
    of `samples_per_epoch` come from them 3:1 (draws are weighted by shard size, so samples,
    not shards, follow the weights); the epoch is deterministic, and resuming it at a batch
    gives the rest of it."""
    from setdiv.data.convert import synthetic_samples
    from setdiv.data.shards import write_shards

    write_shards(synthetic_samples("train", 64, 0), tmp_path / "a", "train", "regions", "s", 16)
    write_shards(synthetic_samples("val", 32, 0), tmp_path / "b", "val", "regions", "s", 8)
    captions = [c for s in synthetic_samples("train", 64, 0) for c in s.captions]
    tok = tokenizer(captions + [c for s in synthetic_samples("val", 32, 0) for c in s.captions])
    sources = [(f"{tmp_path}/a/train-*.tar", 3.0), (f"{tmp_path}/b/val-*.tar", 1.0)]
    opts = SampleOptions("regions", tok, train=True)
    reader = TrainReader(
        sources, opts, batch_size=16, num_workers=1, shuffle_buffer=8, samples_per_epoch=3200
    )
    assert reader.batches_per_epoch == 200
    batches = list(reader.epoch(0))
    ids = [i for b in batches for i in b.image_ids]
    a_ids = {s.image_id for s in synthetic_samples("train", 64, 0)}
    share = sum(i in a_ids for i in ids) / len(ids)
    assert len(ids) == 3200 and 0.70 <= share <= 0.80, share
    again = TrainReader(
        sources, opts, batch_size=16, num_workers=1, shuffle_buffer=8, samples_per_epoch=3200
    )
    rest = list(again.epoch(0, start_batch=150))
    assert [b.image_ids for b in rest] == [b.image_ids for b in batches[150:]]
    assert torch.equal(rest[0].images, batches[150].images)
    other = [i for b in again.epoch(1) for i in b.image_ids]
    assert other != ids  # a new epoch draws anew


def test_a_source_without_samples_is_one_error_before_any_draw(tmp_path: Path) -> None:
    """A weighted source whose shards hold 0 readable samples (an empty img2dataset tar) once
    made the reader plan ~4e9 draws (its mean shard size floored at 1e-9) and fill memory. It
    is now one UserError naming the source, raised before the draws are planned."""
    write_web_shard(tmp_path / "good-0000.tar", [
        {"key": f"{i:03d}".encode(), "jpg": jpeg((i * 40, 0, 0)), "txt": b"a red square"}
        for i in range(4)
    ])  # fmt: skip
    with tarfile.open(tmp_path / "empty-0000.tar", "w"):
        pass
    tok = tokenizer(["a red square"])
    opts = SampleOptions("image", tok, True, 16, format="img2dataset")
    sources = [(str(tmp_path / "good-0000.tar"), 1.0), (str(tmp_path / "empty-0000.tar"), 1.0)]
    with pytest.raises(UserError, match=r"train_sources: source '.*empty-0000.tar'.* 0 readable"):
        TrainReader(sources, opts, batch_size=2, num_workers=1, samples_per_epoch=8)
    with pytest.raises(UserError, match="training data .* 0 readable"):
        TrainReader(str(tmp_path / "empty-0000.tar"), opts, batch_size=2, num_workers=1)
    # the good source alone reads
    good = TrainReader(sources[:1], opts, batch_size=2, num_workers=1, samples_per_epoch=8)
    assert good.batches_per_epoch == 4


@pytest.mark.parametrize("fmt", ["img2dataset", "auto"])
def test_a_missing_web_shard_in_a_brace_list_is_an_error(tmp_path: Path, fmt: str) -> None:
    """`web-{0000..0002}.tar` with 0001 absent: the missing shard was a warning ("unreadable
    after 0 samples") and training went on; it is FileNotFoundError naming it (exit 2)."""
    for i in (0, 2):
        write_web_shard(tmp_path / f"web-000{i}.tar", [
            {"key": b"000", "jpg": jpeg((200, 0, 0)), "txt": b"a red square"}
        ])  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"missing shard: .*web-0001\.tar"):
        ShardSet.resolve(f"{tmp_path}/web-{{0000..0002}}.tar", "image", fmt)
    assert ShardSet.resolve(f"{tmp_path}/web-{{0000,0002}}.tar", "image", fmt).num_samples == 2


def test_format_auto_looks_past_an_empty_shard_and_names_what_it_looked_for(
    tmp_path: Path,
) -> None:
    """`data.format: auto` once took an empty first shard, or captions kept only in `.json`,
    for setdiv shards and said "shard index not found ... write shards with `setdiv shards`".
    An empty shard is looked past; `data.caption_key` means img2dataset; otherwise the error
    names the index and the members it looked for and at."""
    with tarfile.open(tmp_path / "web-0000.tar", "w"):
        pass
    write_web_shard(tmp_path / "web-0001.tar", [
        {"key": b"000", "jpg": jpeg((200, 0, 0)), "txt": b"a red square"}
    ])  # fmt: skip
    found = ShardSet.resolve(f"{tmp_path}/web-{{0000..0001}}.tar", "image", "auto")
    assert found.format == "img2dataset" and found.num_samples == 1
    meta = json.dumps({"status": "success", "caption": "a blue sky"}).encode()
    write_web_shard(tmp_path / "json-0000.tar", [
        {"key": b"000", "jpg": jpeg((0, 0, 200)), "json": meta}
    ])  # fmt: skip
    with pytest.raises(UserError) as err:
        ShardSet.resolve(str(tmp_path / "json-0000.tar"), "image", "auto")
    msg = str(err.value)
    assert "json-index.json" in msg and "000.jpg, 000.json" in msg and "caption_key" in msg
    assert "write shards with" not in msg
    by_key = ShardSet.resolve(str(tmp_path / "json-0000.tar"), "image", "auto", "caption")
    assert by_key.format == "img2dataset"
    tok = tokenizer(["a blue sky"])
    opts = SampleOptions("image", tok, False, 16, caption_key="caption")
    batch = next(iter(EvalReader(str(tmp_path / "json-0000.tar"), opts, batch_size=4)))
    assert batch.captions == ["a blue sky"]
