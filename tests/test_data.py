"""Shards and readers: SCAN, Karpathy and synthetic conversion, rank x worker splits, bad input."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from setdiv import cli
from setdiv import config as config_lib
from setdiv.data import convert, synthetic
from setdiv.data.reader import EvalReader, SampleOptions, ShardSet, TrainReader, plan_epoch
from setdiv.data.samples import image_file_pixels
from setdiv.data.shards import ShardIndex, write_shards
from setdiv.data.text import Tokenizer, build_tokenizer, word_dropout
from setdiv.data.vocab import SPECIALS, Vocab
from setdiv.distributed import job_from_env


def vocab_tokenizer(captions: list[str]) -> Tokenizer:
    vocab = Vocab.build(captions)
    return Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))


SYNTH_TOK = vocab_tokenizer([c for i in range(300) for c in synthetic.make_scene(0, i).captions])


def make_synth(
    out: Path, n: int, shard_size: int, split: str = "train", kind: str = "regions"
) -> ShardIndex:
    samples = convert.synthetic_samples(split, n, seed=0, kind=kind)
    return write_shards(samples, out, split, kind, "synthetic", shard_size)


def all_ids(reader_batches) -> list[str]:  # noqa: ANN001
    return [i for b in reader_batches for i in b.image_ids]


# --- SCAN precomputed features ----------------------------------------------------------------


def write_scan(root: Path, split: str, n: int, c: int = 16, ids_per_caption: bool = False) -> tuple:
    rng = np.random.default_rng(0)
    ims = rng.standard_normal((n, 36, c)).astype(np.float32)
    np.save(root / f"{split}_ims.npy", ims)
    caps = [f"caption {j} of image {i}" for i in range(n) for j in range(5)]
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    ids = [str(1000 + i) for i in range(n)]
    lines = [x for x in ids for _ in range(5)] if ids_per_caption else ids
    (root / f"{split}_ids.txt").write_text("\n".join(lines) + "\n")
    return ims, caps, ids


@pytest.mark.parametrize("ids_per_caption", [False, True])
def test_scan_layout_round_trip(tmp_path: Path, ids_per_caption: bool) -> None:
    ims, caps, ids = write_scan(tmp_path, "testall", 7, ids_per_caption=ids_per_caption)
    out = tmp_path / "shards"
    assert (
        cli.main(
            [
                "shards",
                "precomp",
                "--root",
                str(tmp_path),
                "--split",
                "testall",
                "--out",
                str(out),
                "--shard-size",
                "3",
            ]
        )
        == 0
    )
    index = ShardIndex.load(out / "testall-index.json")
    assert [s.samples for s in index.shards] == [3, 3, 1] and index.kind == "regions"
    tok = vocab_tokenizer(caps)
    reader = EvalReader(
        f"{out}/testall-*.tar", SampleOptions("regions", tok, train=False), batch_size=2
    )
    batches = list(reader)
    assert all_ids(batches) == ids  # every image once, in order
    feats = torch.cat([b.images for b in batches])
    np.testing.assert_allclose(feats.numpy(), ims.astype(np.float16).astype(np.float32))
    assert all(b.image_mask.all() for b in batches)
    tokens = torch.cat(
        [torch.nn.functional.pad(b.tokens, (0, 12 - b.tokens.shape[1])) for b in batches]
    )
    assert [tok.vocab.encode(c) for c in caps] == [t[t != 0].tolist() for t in tokens]
    assert [c for b in batches for c in b.caption_ids] == list(range(35))


def test_scan_short_captions_name_the_image(tmp_path: Path) -> None:
    write_scan(tmp_path, "dev", 3)
    lines = (tmp_path / "dev_caps.txt").read_text().splitlines()[:-2]
    (tmp_path / "dev_caps.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="image 1002"):
        write_shards(
            convert.precomp_samples(tmp_path, "dev"), tmp_path / "o", "dev", "regions", "x"
        )


def test_scan_conversion_memory_does_not_grow_with_dataset(tmp_path: Path) -> None:
    n, c = 300, 2048  # 88 MB of float32 features
    np.lib.format.open_memmap(
        tmp_path / "train_ims.npy", mode="w+", dtype=np.float32, shape=(n, 36, c)
    )[:] = 1.0
    (tmp_path / "train_caps.txt").write_text("".join(f"c{i}\n" for i in range(5 * n)))
    tracemalloc.start()
    write_shards(
        convert.precomp_samples(tmp_path, "train"), tmp_path / "o", "train", "regions", "x", 50
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 25e6, f"peak Python/numpy allocation {peak / 1e6:.0f} MB for an 88 MB dataset"


# --- Karpathy JSON + JPEGs --------------------------------------------------------------------


def write_karpathy(root: Path) -> Path:
    (root / "val2014").mkdir(parents=True)
    images = []
    for i, split in enumerate(["train", "restval", "test", "test", "val"]):
        name = f"COCO_{i}.jpg"
        Image.new("RGB", (80 + 10 * i, 60), (40 * i, 100, 200)).save(root / "val2014" / name)
        n_sent = 6 if i == 2 else 5
        sents = [{"raw": f"image {i} sentence {j}", "sentid": 100 * i + j} for j in range(n_sent)]
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "split": split,
                "cocoid": 500 + i,
                "sentences": sents,
            }
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_karpathy_converts_and_decodes(tmp_path: Path) -> None:
    js = write_karpathy(tmp_path)
    out = tmp_path / "shards"
    cli.main(
        [
            "shards",
            "karpathy",
            "--json",
            str(js),
            "--images",
            str(tmp_path),
            "--split",
            "test",
            "--out",
            str(out),
        ]
    )
    tok = vocab_tokenizer([f"image {i} sentence {j}" for i in range(5) for j in range(6)])
    batches = list(EvalReader(f"{out}/test-000000.tar", SampleOptions("image", tok, False, 32), 4))
    assert all_ids(batches) == ["502", "503"]
    assert batches[0].images.shape == (2, 3, 32, 32) and batches[0].image_mask is None
    assert batches[0].caption_ids == [200, 201, 202, 203, 204, 300, 301, 302, 303, 304]  # first 5
    # The stored bytes are the original file, not a re-encode.
    with tarfile.open(out / "test-000000.tar") as tar:
        assert tar.extractfile("502.jpg").read() == (tmp_path / "val2014/COCO_2.jpg").read_bytes()
    # An image file as a search query becomes exactly what evaluation reads from the shard.
    query = image_file_pixels(tmp_path / "val2014/COCO_2.jpg", 32)
    assert torch.equal(query[0], batches[0].images[0])
    with pytest.raises(ValueError, match="not a readable image"):
        image_file_pixels(io.BytesIO(b"GIF89a garbage"), 32)
    cli.main(
        [
            "shards",
            "karpathy",
            "--json",
            str(js),
            "--images",
            str(tmp_path),
            "--split",
            "train",
            "--restval",
            "--out",
            str(out),
        ]
    )
    assert ShardIndex.load(out / "train-index.json").num_samples == 2


def test_karpathy_short_image_fails_or_is_dropped(tmp_path: Path) -> None:
    js = write_karpathy(tmp_path)
    data = json.loads(js.read_text())
    data["images"][3]["sentences"] = data["images"][3]["sentences"][:4]
    js.write_text(json.dumps(data))
    args = [
        "shards",
        "karpathy",
        "--json",
        str(js),
        "--images",
        str(tmp_path),
        "--split",
        "test",
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.raises(ValueError, match="image 503 has 4 captions"):
        list(convert.karpathy_samples(js, tmp_path, "test"))
    assert cli.main(args) == 2
    assert cli.main([*args, "--min-captions"]) == 0
    index = ShardIndex.load(tmp_path / "o/test-index.json")
    assert (index.num_samples, index.dropped) == (1, 1)


# --- synthetic dataset ------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_ambiguous() -> None:
    a = [synthetic.make_scene(3, i) for i in range(200)]
    assert a == [synthetic.make_scene(3, i) for i in range(200)]
    assert a != [synthetic.make_scene(4, i) for i in range(200)]
    assert all(len(set(s.captions)) == 5 and 2 <= len(s.objects) <= 5 for s in a)
    owners = Counter(c for s in a for c in set(s.captions))
    assert max(owners.values()) >= 3  # one caption fits several images
    for s in a[:20]:  # each caption names objects that are really in its scene
        for cap in s.captions:
            assert any(f"{o.colour} {o.shape}" in cap for o in s.objects)
    assert synthetic.render_regions(a[0]).shape == (synthetic.NUM_REGIONS, synthetic.REGION_DIM)
    assert Image.open(io.BytesIO(synthetic.render_image(a[0], 48))).size == (48, 48)


# --- training reader: splitting, shuffling, equal batches -------------------------------------


def read_epoch(pattern: str, epoch: int, rank: int, world: int, bs: int, workers: int = 2) -> list:
    opts = SampleOptions("regions", SYNTH_TOK, train=True)
    reader = TrainReader(pattern, opts, bs, rank, world, num_workers=workers, shuffle_buffer=20)
    return list(reader.epoch(epoch))


def simulated_ranks(
    pattern: str, epoch: int, bs: int, monkeypatch: pytest.MonkeyPatch
) -> list[list]:
    out = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        w = job_from_env()
        out.append(read_epoch(pattern, epoch, w.rank, w.world_size, bs))
    return out


def test_two_ranks_two_workers_disjoint_complete_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_synth(tmp_path, 160, 20)  # 8 equal shards
    pattern = f"{tmp_path}/train-{{000000..000007}}.tar"
    ranks = simulated_ranks(pattern, 0, 8, monkeypatch)
    assert len(ranks[0]) == len(ranks[1]) == 10
    ids = [all_ids(r) for r in ranks]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == [f"train{i:07d}" for i in range(160)]
    assert all(b.tokens.shape[0] == 5 * b.images.shape[0] for r in ranks for b in r)


def test_uneven_last_shard_still_gives_equal_batch_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_synth(tmp_path, 150, 20)  # 7 shards of 20 and one of 10
    pattern = f"{tmp_path}/train-*.tar"
    for epoch in range(3):
        ranks = simulated_ranks(pattern, epoch, 8, monkeypatch)
        assert len(ranks[0]) == len(ranks[1]) == (3 * 20 + 10) // 8
        ids = [all_ids(r) for r in ranks]
        assert not set(ids[0]) & set(ids[1]) and len(set(ids[0])) == len(ids[0])
    plans = plan_epoch(ShardSet.resolve(pattern), 0, 0, 2)
    assert sorted(plans[0] + plans[1]) == list(range(8))  # every shard read by exactly one rank


def test_epoch_order_is_reproducible_and_changes(tmp_path: Path) -> None:
    make_synth(tmp_path, 80, 10)
    pattern = f"{tmp_path}/train-*.tar"
    e0 = all_ids(read_epoch(pattern, 0, 0, 1, 8))
    assert e0 == all_ids(read_epoch(pattern, 0, 0, 1, 8))
    e1 = all_ids(read_epoch(pattern, 1, 0, 1, 8))
    assert e1 != e0 and sorted(e1) == sorted(e0)


@pytest.mark.parametrize(("workers", "kind"), [(0, "regions"), (2, "regions"), (3, "image")])
def test_a_resumed_epoch_is_the_rest_of_the_epoch_and_skips_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, kind: str
) -> None:
    """Resuming at batch s gives batches s.. of the uninterrupted epoch, tensor for tensor
    (with dropouts, random crops and a shuffle buffer), for resume points that fall mid-chunk
    and mid-round of the workers' round robin; the skipped samples are not decoded."""
    from setdiv.data import reader as reader_mod
    from setdiv.data import samples as samples_mod

    make_synth(tmp_path, 60 if kind == "image" else 120, 10, kind=kind)
    opts = SampleOptions(kind, SYNTH_TOK, True, 32, region_dropout=0.3, word_dropout=0.2)
    reader = TrainReader(f"{tmp_path}/train-*.tar", opts, 7, num_workers=workers, shuffle_buffer=9)
    full = list(reader.epoch(1))
    assert len(full) == reader.batches_per_epoch
    for start in (1, 3, len(full) - 1):
        rest = list(reader.epoch(1, start))
        assert len(rest) == len(full) - start
        for a, b in zip(full[start:], rest, strict=True):
            assert a.image_ids == b.image_ids and torch.equal(a.tokens, b.tokens)
            assert torch.equal(a.images, b.images)
    if workers == 0:  # decoding happens in this process: count it
        decoded = []
        real = samples_mod._decode
        monkeypatch.setattr(samples_mod, "_decode", lambda *a: decoded.append(1) or real(*a))
        start = len(full) - 3
        assert len(list(reader.epoch(1, start))) == 3
        assert len(decoded) <= 3 * 7 + reader_mod.CHUNK  # not the 14 batches before


def test_resampled_reader_gives_planned_batches(tmp_path: Path) -> None:
    make_synth(tmp_path, 60, 10)
    opts = SampleOptions("regions", SYNTH_TOK, train=True)
    reader = TrainReader(f"{tmp_path}/train-*.tar", opts, 8, 1, 2, num_workers=2, resampled=True)
    assert len(list(reader.epoch(0))) == reader.batches_per_epoch == 60 // 16


def test_a_shard_drawn_twice_is_augmented_differently_each_time(tmp_path: Path) -> None:
    """Resampled, a pass may draw the same shard twice; each draw's samples get their own
    region and word dropout (they used to repeat the first draw's exactly)."""
    make_synth(tmp_path, 20, 10)
    opts = SampleOptions("regions", SYNTH_TOK, True, region_dropout=0.5, word_dropout=0.3)
    pattern = f"{tmp_path}/train-*.tar"
    seed = next(  # a seed whose first pass draws one shard twice
        s for s in range(100)
        if len({d["url"] for d in TrainReader(pattern, opts, 5, num_workers=0, seed=s,
                                              resampled=True)._pass_shards(0, 0)[0]}) == 1
    )  # fmt: skip
    reader = TrainReader(pattern, opts, 5, num_workers=0, seed=seed, resampled=True)
    batches = list(reader.epoch(0))
    seen: dict[str, list[tuple]] = {}
    for b in batches:
        for i, image_id in enumerate(b.image_ids):
            regions = b.images[i][b.image_mask[i]].numpy().tobytes()
            rows = range(5 * i, 5 * i + 5)
            words = tuple(tuple(b.tokens[r][b.token_mask[r]].tolist()) for r in rows)
            seen.setdefault(image_id, []).append((regions, words))
    assert len(seen) == 10 and all(len(v) == 2 for v in seen.values())
    assert sum(a != b for a, b in seen.values()) >= 9


def test_region_and_word_dropout_in_training(tmp_path: Path) -> None:
    make_synth(tmp_path, 40, 10)
    opts = SampleOptions("regions", SYNTH_TOK, train=True, region_dropout=0.5, word_dropout=0.3)
    batches = list(TrainReader(f"{tmp_path}/train-*.tar", opts, 10, num_workers=0).epoch(0))
    kept = torch.cat([b.image_mask.sum(1) for b in batches]).float()
    assert kept.min() >= 1 and 2.5 < kept.mean() < 5.5  # 8 regions, p = 0.5
    assert all((b.tokens[:, 0] == SYNTH_TOK.vocab.start).all() for b in batches)


def test_word_dropout_statistics() -> None:
    tok = SYNTH_TOK
    rng = np.random.default_rng(0)
    ids = [tok.vocab.start] + [10] * 20000 + [tok.vocab.end]
    out = word_dropout(ids, tok, 0.2, rng)
    assert out[0] == tok.vocab.start and out[-1] == tok.vocab.end
    inner = out[1:-1]
    c = Counter(inner)
    assert abs(c[tok.mask_id] / 20000 - 0.10) < 0.01  # 0.2 * 50% masked
    assert abs((20000 - len(inner)) / 20000 - 0.08) < 0.01  # 0.2 * 40% deleted
    randoms = sum(v for k, v in c.items() if k not in (10, tok.mask_id))
    assert abs(randoms / 20000 - 0.02) < 0.005  # 0.2 * 10% random words


def test_bert_tokenizer_from_local_directory(tmp_path: Path) -> None:
    from transformers import BertTokenizer

    from setdiv.config import TextEncoderConfig

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    tok = build_tokenizer(TextEncoderConfig(name="bert", bert_path=str(tmp_path / "bert")))
    assert tok.encode("A red circle") == [2, 5, 6, 7, 3]
    assert (tok.pad_id, tok.mask_id, tok.first_word_id) == (0, 4, 5)


# --- bad input --------------------------------------------------------------------------------


def rewrite_member(shard: Path, name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            payload = data if m.name == name else payload
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


def test_corrupt_sample_and_truncated_tar_are_skipped_and_counted(tmp_path: Path) -> None:
    make_synth(tmp_path, 40, 10)
    rewrite_member(tmp_path / "train-000001.tar", "train0000012.npy", b"not an npy file")
    truncated = tmp_path / "train-000003.tar"
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("train0000034.npy").offset_data + 100  # mid-way through sample 4
    truncated.write_bytes(truncated.read_bytes()[:cut])
    opts = SampleOptions("regions", SYNTH_TOK, train=False)
    eval_reader = EvalReader(f"{tmp_path}/train-*.tar", opts, 8)
    ids = all_ids(eval_reader)
    assert "train0000012" not in ids and "train0000033" in ids and "train0000034" not in ids
    assert len(ids) == 40 - 1 - 6
    assert eval_reader.skipped == 7
    train = TrainReader(f"{tmp_path}/train-*.tar", opts, 4, num_workers=2, verify=False)
    batches = list(train.epoch(0))
    assert len(batches) == train.batches_per_epoch == 10  # refilled from a second pass
    assert sum(b.skipped for b in batches) >= 7


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_over_corrupt_samples_lands_on_the_next_batch(
    tmp_path: Path, workers: int
) -> None:
    """Corrupt samples and a truncated tar before the resume point: resuming from the
    `position` read after batch s-1 gives batches s.. of the uninterrupted epoch (same samples,
    tensors and skipped counts), also in the refill pass; resuming by batch count alone lands
    early by the corrupt samples before it."""
    make_synth(tmp_path, 80, 10)
    for name in ("train0000012.npy", "train0000017.npy"):
        rewrite_member(tmp_path / "train-000001.tar", name, b"not an npy file")
    truncated = tmp_path / "train-000003.tar"
    with tarfile.open(truncated) as tar:
        cut = tar.getmember("train0000034.npy").offset_data + 100
    truncated.write_bytes(truncated.read_bytes()[:cut])
    opts = SampleOptions("regions", SYNTH_TOK, True, region_dropout=0.3, word_dropout=0.2)
    pattern = f"{tmp_path}/train-*.tar"
    reader = TrainReader(pattern, opts, 6, num_workers=workers, shuffle_buffer=9, verify=False)
    full, positions = [], []
    for batch in reader.epoch(1):
        full.append(batch)
        positions.append(reader.position)
    assert sum(b.skipped for b in full) >= 8  # 2 corrupt + 6 truncated: a second pass
    assert positions[-1] > 80
    by_count_differs = False
    for start in range(1, len(full)):
        rest = list(reader.epoch(1, start, positions[start - 1]))
        assert len(rest) == len(full) - start
        for a, b in zip(full[start:], rest, strict=True):
            assert a.image_ids == b.image_ids and a.skipped == b.skipped
            assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
        if sum(b.skipped for b in full[:start]) and start == len(full) - 1:
            by_count = next(reader.epoch(1, start))
            by_count_differs = by_count.image_ids != full[start].image_ids
    assert by_count_differs


def test_all_corrupt_shards_fail_after_one_pass_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every sample bad: one pass, then an error naming the shards and the real count (the
    reader used to re-read them up to 1000 times)."""
    from setdiv.data import reader as reader_mod
    from setdiv.data import samples as samples_mod

    make_synth(tmp_path, 40, 10)
    for i in range(4):
        shard = tmp_path / f"train-{i:06d}.tar"
        for j in range(10):
            rewrite_member(shard, f"train{10 * i + j:07d}.npy", b"garbage")
    opened = []
    real = reader_mod.read_shard
    monkeypatch.setattr(reader_mod, "read_shard", lambda p, h, r: opened.append(p) or real(p, h, r))
    warner = samples_mod._Warner()
    monkeypatch.setattr(samples_mod, "WARN", warner)
    opts = SampleOptions("regions", SYNTH_TOK, train=True)
    train = TrainReader(f"{tmp_path}/train-*.tar", opts, 4, num_workers=0, verify=False)
    with pytest.raises(ValueError, match=r"no readable training sample .*4 shard\(s\)") as err:
        next(train.epoch(0))
    assert "40 of 40 samples are corrupt" in str(err.value)
    assert "train-000000.tar" in str(err.value)
    assert len(opened) == 4  # one pass
    assert warner.count == 40
    # A truncated shard counts every sample it lost, not one.
    warner.count = 0
    (tmp_path / "train-000000.tar").write_bytes(b"not a tar at all")
    with pytest.raises(ValueError, match="40 of 40"):
        next(train.epoch(0))
    assert warner.count == 40


def test_closing_an_epoch_shuts_its_workers_down_then_and_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception raised while the workers shut down (a requeue signal handler's
    SystemExit) must reach whoever closed the epoch, not be swallowed by a finaliser."""
    from setdiv.data import workers as data_workers

    class RequeueError(Exception):
        pass

    real_start = data_workers.start_data_workers

    def start(loader: object) -> object:
        it = real_start(loader)
        shutdown, raised = it._shutdown_workers, []

        def shutdown_then_signal() -> None:
            shutdown()
            if not raised:
                raised.append(1)
                raise RequeueError

        it._shutdown_workers = shutdown_then_signal
        return it

    monkeypatch.setattr(data_workers, "start_data_workers", start)
    make_synth(tmp_path, 40, 10)
    opts = SampleOptions("regions", SYNTH_TOK, train=True)
    batches = TrainReader(f"{tmp_path}/train-*.tar", opts, 4, num_workers=1).epoch(0)
    next(batches)
    with pytest.raises(RequeueError):
        batches.close()


def test_a_requeue_signal_in_a_worker_finaliser_reaches_the_epoch_closer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job signal arriving while a pass's workers are freed (multiprocessing finalisers run
    then, and would swallow what the handler raises: submitit's requeue SystemExit) is handled
    once they are done, and its exception reaches whoever closed the epoch."""
    import weakref

    from setdiv.data import workers as data_workers

    class RequeueError(Exception):
        pass

    def requeue(_signum: int, _frame: object) -> None:
        raise RequeueError

    real_start = data_workers.start_data_workers

    def start(loader: object) -> object:
        workers = real_start(loader)
        weakref.finalize(workers, os.kill, os.getpid(), signal.SIGUSR2)  # signal in a finaliser
        return workers

    monkeypatch.setattr(data_workers, "start_data_workers", start)
    make_synth(tmp_path, 40, 10)
    opts = SampleOptions("regions", SYNTH_TOK, train=True)
    batches = TrainReader(f"{tmp_path}/train-*.tar", opts, 4, num_workers=1).epoch(0)
    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        next(batches)
        with pytest.raises(RequeueError):
            batches.close()
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_missing_shard_checksum_and_too_few_shards_fail_early(tmp_path: Path) -> None:
    make_synth(tmp_path, 30, 10)
    opts = SampleOptions("regions", SYNTH_TOK, train=True)
    with pytest.raises(FileNotFoundError, match="missing shard: .*train-000003.tar"):
        TrainReader(f"{tmp_path}/train-{{000000..000007}}.tar", opts, 4)
    with pytest.raises(ValueError, match="3 shards for 2 ranks x 2 workers"):
        TrainReader(f"{tmp_path}/train-*.tar", opts, 4, rank=0, world=2, num_workers=2)
    shard = tmp_path / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="checksum mismatch for shard .*train-000002.tar"):
        TrainReader(f"{tmp_path}/train-*.tar", opts, 4, num_workers=1)
    os.remove(tmp_path / "train-index.json")
    with pytest.raises(FileNotFoundError, match="shard index not found"):
        TrainReader(f"{tmp_path}/train-*.tar", opts, 4, num_workers=1)


def test_eval_reader_ranks_take_contiguous_slices(tmp_path: Path) -> None:
    make_synth(tmp_path, 47, 10, split="test")
    opts = SampleOptions("regions", SYNTH_TOK, train=False)
    parts = [
        all_ids(EvalReader(f"{tmp_path}/test-*.tar", opts, 5, rank=r, world=3)) for r in range(3)
    ]
    assert [len(p) for p in parts] == [16, 16, 15]
    assert parts[0] + parts[1] + parts[2] == [f"test{i:07d}" for i in range(47)]
    aligned = [EvalReader(f"{tmp_path}/test-*.tar", opts, 5, r, 4, align=16) for r in range(4)]
    assert [len(all_ids(r)) for r in aligned] == [16, 16, 15, 0]  # the last rank has none


_SIGNAL_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
from setdiv.data.reader import SampleOptions, TrainReader
from test_data import SYNTH_TOK

out = Path(sys.argv[2])
main_pid = os.getpid()
signal.signal(signal.SIGUSR2, lambda *_: open(out, "a").write(f"{os.getpid()}\\n"))

def children():
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == main_pid:
                pids.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return pids

done = threading.Event()
def storm():  # what a launcher does on preemption: USR2 to every process of the job step
    while not done.is_set():
        for pid in [main_pid, *children()]:
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass
        time.sleep(0.002)

threading.Thread(target=storm, daemon=True).start()
reader = TrainReader(sys.argv[1], SampleOptions("regions", SYNTH_TOK, train=True), 8, 0, 1,
                     num_workers=2, shuffle_buffer=20)
n = sum(1 for e in range(4) for _ in reader.epoch(e))
done.set()
print(n, main_pid)
"""


def test_requeue_signals_reach_the_rank_never_its_data_workers(tmp_path: Path) -> None:
    """Workers are forked with USR2 blocked and drop it before unblocking: a signal storm over
    every process of the rank, across worker start-ups, only ever runs the rank's handler."""
    make_synth(tmp_path, 160, 20)
    (tmp_path / "script.py").write_text(_SIGNAL_SCRIPT)
    r = subprocess.run(
        [sys.executable, tmp_path / "script.py", f"{tmp_path}/train-*.tar", tmp_path / "h"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    batches, rank_pid = r.stdout.split()
    assert int(batches) == 4 * 20  # every batch of 4 epochs, nothing lost to a signal
    assert set((tmp_path / "h").read_text().split()) == {rank_pid}  # the rank's handler only


def _describe(steps: list) -> list[tuple]:
    """(class name, size, scale, ratio, p) of v1 or v2 torchvision transforms."""
    out = []
    for t in steps:
        size = getattr(t, "size", None)
        size = [size] if isinstance(size, int) else list(size) if size else None
        out.append((type(t).__name__, size, getattr(t, "scale", None), getattr(t, "p", None)))
    return out


@pytest.mark.parametrize(
    ("style", "size", "official_train", "official_test"),
    [
        # official data.py get_image_transform: crop_size 224, and the gpo_aug 512 variant
        (
            "crop",
            224,
            lambda T: [T.RandomResizedCrop(224), T.RandomHorizontalFlip()],
            lambda T: [T.Resize(int(224 / 0.875)), T.CenterCrop(224)],
        ),
        (
            "gpo512",
            512,
            lambda T: [T.RandomResizedCrop(512, scale=(0.36, 1)), T.RandomHorizontalFlip()],
            lambda T: [T.Resize((512, 512))],
        ),
    ],
)
def test_image_transforms_match_the_official_pipeline(
    style: str, size: int, official_train: object, official_test: object
) -> None:
    import torchvision.transforms as T

    from setdiv.data.images import image_transform_steps

    train = image_transform_steps(size, True, style)
    test = image_transform_steps(size, False, style)
    assert _describe(train) == _describe(official_train(T))  # type: ignore[operator]
    assert _describe(test) == _describe(official_test(T))  # type: ignore[operator]
    assert [t.ratio for t in train[:1]] == [T.RandomResizedCrop(size).ratio]
    assert _describe(image_transform_steps(size, True, style, hflip=False)) == _describe(
        official_train(T)[:1]  # type: ignore[operator]
    )
    assert _describe(test)[0][1] == ([256] if style == "crop" else [512, 512])


def test_recipe_configs_pick_the_official_transforms() -> None:
    root = Path(__file__).parents[1] / "configs"
    bert = config_lib.load([root / "resnext_bert.yaml"]).data
    assert (bert.image_transform, bert.image_size, bert.hflip) == ("gpo512", 512, True)
    assert config_lib.load([root / "resnet_bigru.yaml"]).data.image_transform == "crop"
