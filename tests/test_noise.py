"""Noisy pairs (`data.caption_noise`, docs/objectives.md) on the three data paths (SCAN layout,
img2dataset, synthetic): exactly the asked share of training captions is replaced, each by a
caption of another image; the same captions on every rank, epoch and seed; evaluation untouched.

The reference is the data itself: the SCAN and web fixtures give every caption a unique text
naming its image, so a replaced caption is recognised, and its donor read off, by its text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from run_helpers import run_setdiv, tiny_overrides, write_data
from test_data_web import jpeg, write_web_shard

from setdiv import cli
from setdiv.data.reader import EvalReader, SampleOptions, TrainReader
from setdiv.data.text import Tokenizer
from setdiv.data.vocab import SPECIALS, Vocab
from setdiv.errors import UserError

ROOT = Path(__file__).parents[1]


def tokenizer(captions: list[str]) -> Tokenizer:
    vocab = Vocab.build(captions)
    return Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))


def epoch_captions(reader: TrainReader, epoch: int = 0) -> dict[tuple[str, int], str]:
    """(image id, caption index) -> the caption training read, over one epoch."""
    out = {}
    for batch in reader.epoch(epoch):
        captions = iter(batch.captions)
        for image, count in zip(batch.image_ids, batch.caption_counts, strict=True):
            for j in range(count):
                out[(str(image), j)] = next(captions)
    return out


def scan_shards(tmp_path: Path, n: int = 40) -> tuple[str, dict[tuple[str, int], str]]:
    """SCAN-layout files with unique captions ("image 1003 says 2"), converted by the CLI."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train_ims.npy", rng.standard_normal((n, 36, 8)).astype(np.float32))
    ids = [str(1000 + i) for i in range(n)]
    caps = {(i, j): f"image {i} says {j}" for i in ids for j in range(5)}
    (tmp_path / "train_caps.txt").write_text("\n".join(caps.values()) + "\n")
    (tmp_path / "train_ids.txt").write_text("\n".join(ids) + "\n")
    out = tmp_path / "shards"
    argv = ["shards", "precomp", "--root", str(tmp_path), "--split", "train", "--out", str(out)]
    assert cli.main([*argv, "--shard-size", "10"]) == 0
    return f"{out}/train-*.tar", caps


def options(kind: str, tok: Tokenizer, noise: float, seed: int = 0) -> SampleOptions:
    return SampleOptions(
        kind, tok, True, 32, region_dropout=0.0, word_dropout=0.0, caption_noise=noise,
        caption_noise_seed=seed,
    )  # fmt: skip


def donor(text: str) -> str:
    """The image a unique caption text names."""
    return text.split()[1]


@pytest.mark.parametrize("noise", [0.2, 0.5])
def test_scan_layout_noise_replaces_exactly_the_share_by_other_images_captions(
    tmp_path: Path, noise: float
) -> None:
    pattern, caps = scan_shards(tmp_path)
    tok = tokenizer(list(caps.values()))
    readers = [
        TrainReader(pattern, options("regions", tok, noise, seed=7), 10, rank, 2, 1, seed=3)
        for rank in range(2)
    ]
    seen = {**epoch_captions(readers[0]), **epoch_captions(readers[1])}
    assert len(seen) == len(caps) == 200  # every caption of the epoch, over both ranks
    replaced = {k: t for k, t in seen.items() if t != caps[k]}
    assert len(replaced) == round(noise * 200)
    assert all(donor(t) != image for (image, _), t in replaced.items())  # another image's
    assert all(t in caps.values() for t in replaced.values())  # a real caption
    # the same pairs are wrong in every epoch (and, with the same seed, in every run)
    again = {**epoch_captions(readers[0], 1), **epoch_captions(readers[1], 1)}
    assert again == seen
    other = TrainReader(pattern, options("regions", tok, noise, seed=8), 10, 0, 1, 1, seed=3)
    assert {k for k, t in epoch_captions(other).items() if t != caps[k]} != set(replaced)
    # evaluation reads the shards as they are
    clean = EvalReader(pattern, SampleOptions("regions", tok, False), batch_size=16)
    assert [c for b in clean for c in b.captions] == list(caps.values())
    quiet = TrainReader(pattern, options("regions", tok, 0.0), 10, 0, 1, 1, seed=3)
    assert all(t == caps[k] for k, t in epoch_captions(quiet).items())


def test_img2dataset_noise_swaps_whole_captions_between_images(tmp_path: Path) -> None:
    keys = [f"{i:03d}" for i in range(24)]
    for s in range(2):
        write_web_shard(
            tmp_path / f"web-{s}.tar",
            [
                {
                    "key": k.encode(),
                    "jpg": jpeg((i, 0, 0)),
                    "txt": f"photo {k} of a thing".encode(),
                    "json": b'{"status": "success"}',
                }
                for i, k in enumerate(keys[12 * s : 12 * (s + 1)])
            ],  # fmt: skip
        )
    caps = {(k, 0): f"photo {k} of a thing" for k in keys}
    tok = tokenizer(list(caps.values()))
    reader = TrainReader(f"{tmp_path}/web-{{0,1}}.tar", options("image", tok, 0.5), 6, 0, 1, 1)
    seen = epoch_captions(reader)
    assert set(seen) == set(caps)
    replaced = {k: t for k, t in seen.items() if t != caps[k]}
    assert len(replaced) == 12 and all(donor(t) != k for (k, _), t in replaced.items())


def test_synthetic_run_records_the_noise_and_logs_what_it_replaced(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", train=128)
    run = tmp_path / "run"
    done = run_setdiv(
        "train", str(ROOT / "configs/demo.yaml"), *tiny_overrides(data, 1),
        "data.caption_noise=0.5", "data.caption_noise_seed=4", "--run-dir", str(run),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data.caption_noise=0.5: 320 of 640 training captions replaced" in done.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["caption_noise"] == 0.5 and saved["caption_noise_seed"] == 4
    assert any("loss" in json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines())


def test_noise_needs_two_images(tmp_path: Path) -> None:
    write_web_shard(
        tmp_path / "one.tar",
        [{"key": b"a", "jpg": jpeg((1, 2, 3)), "txt": b"lonely", "json": b"{}"}],
    )
    with pytest.raises(UserError, match="data.caption_noise"):
        TrainReader(
            str(tmp_path / "one.tar"), options("image", tokenizer(["lonely"]), 0.5), 1, 0, 1, 1
        )
