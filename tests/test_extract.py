"""`setdiv extract`: a frozen timm tower's token features cached as shards; training from the
cache starts where training on the images does; a killed extraction resumes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from run_helpers import CLEAN_ENV, losses, run_setdiv

timm = pytest.importorskip("timm")
ROOT = Path(__file__).parents[1]
CC12M = ROOT.parent / "shared/data/cc12m_img2dataset_32/cc12m-train-0000.tar"
pytestmark = [
    pytest.mark.skipif(not CC12M.is_file(), reason=f"the real CC12M sample is absent ({CC12M})"),
    pytest.mark.slow,
]


def split_shards(out: Path, n: int) -> str:
    """The 32 CC12M pairs re-packed as `n` img2dataset shards `web-000i.tar` (members as
    they are)."""
    with tarfile.open(CC12M) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members})
    out.mkdir(parents=True)
    for i in range(n):
        mine = set(keys[i::n])
        with tarfile.open(out / f"web-{i:04d}.tar", "w") as sink:
            for m, data in members:
                if m.name.split(".", 1)[0] in mine:
                    sink.addfile(m, io.BytesIO(data))
    return f"{out}/web-{{0000..{n - 1:04d}}}.tar"


def common(tmp_path: Path) -> list[str]:
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    if not weights.is_file():
        torch.manual_seed(0)
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    return [
        str(ROOT / "configs/demo.yaml"), "model.image.name=timm",
        "model.image.arch=vit_tiny_patch16_224", f"model.image.weights={weights}",
        "model.text.vocab_size=null", f"model.text.vocab_path={tmp_path / 'vocab.json'}",
    ]  # fmt: skip


@pytest.mark.timeout(900)
def test_training_from_the_cache_starts_like_training_on_images(tmp_path: Path) -> None:
    """Features of 4 shards extracted by 2 processes; one SGD step from the cache gives the
    first-step loss of the same step on the images (test transform both, fp16 tolerance);
    a SIGKILLed extraction, run again, keeps the shards it finished and ends identical."""
    from setdiv.data.features import cache_name
    from setdiv.data.vocab import Vocab

    data = split_shards(tmp_path / "web", 4)
    with tarfile.open(CC12M) as tar:
        caps = [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]  # type: ignore[union-attr]
    Vocab.build(caps).save(tmp_path / "vocab.json")
    cache = tmp_path / "cache"
    extract = ["extract", *common(tmp_path), "--data", data]
    done = run_setdiv(*extract, "--out", str(cache), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((cache / "features-index.json").read_text())
    assert index["layout"] == "features" and index["num_samples"] == 32
    names = [cache_name(Path(data.split("{")[0] + f"{i:04d}.tar")) for i in range(4)]
    assert sorted(s["name"] for s in index["shards"]) == sorted(names)
    train = [
        f"data.train_shards={data}", "data.batch_size=8", "data.num_workers=1",
        "data.train_transform=test", "data.region_dropout=0", "data.word_dropout=0",
        "train.epochs=1", "train.log_every=1",
    ]  # fmt: skip
    images = run_setdiv("train", *common(tmp_path), *train, "--run-dir", str(tmp_path / "img"))
    assert images.returncode == 0, images.stderr[-3000:]
    cached = run_setdiv(
        "train", *common(tmp_path), *train, f"data.features={cache}",
        "--run-dir", str(tmp_path / "cached"),
    )  # fmt: skip
    assert cached.returncode == 0, cached.stderr[-3000:]
    a, b = losses(tmp_path / "img"), losses(tmp_path / "cached")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert b[1] == pytest.approx(a[1], rel=2e-3), (a, b)
    # Kill an extraction after its first shard, run it again: the finished shard is kept.
    again = tmp_path / "again"
    proc = subprocess.Popen(
        [sys.executable, "-m", "setdiv.cli", "extract", *common(tmp_path), "--data", data,
         "--out", str(again)], cwd=ROOT, env=CLEAN_ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not list(again.glob("*.done")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(again.glob("*.done"))
    assert 1 <= len(first) < 4, "killed too late"
    stamps = {p.name: p.stat().st_mtime_ns for p in again.glob("features-*.tar")}
    resumed = run_setdiv(*extract, "--out", str(again))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{4 - len(first)} of 4 shard(s) to do" in resumed.stdout
    for done_file in first:
        shard = done_file.name.removesuffix(".done")
        assert (again / shard).stat().st_mtime_ns == stamps[shard]
    for name in names:
        assert (again / name).read_bytes() == (cache / name).read_bytes() or _same(
            again / name, cache / name
        )
    assert not list(again.glob(".*.tmp"))


def _same(a: Path, b: Path) -> bool:
    """Same members and arrays (tar headers may differ in mtime)."""

    def read(p: Path) -> dict[str, bytes]:
        with tarfile.open(p) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]

    ra, rb = read(a), read(b)
    if ra.keys() != rb.keys():
        return False
    for name in ra:
        if name.endswith(".npy"):
            if not np.array_equal(np.load(io.BytesIO(ra[name])), np.load(io.BytesIO(rb[name]))):
                return False
        elif ra[name] != rb[name]:
            return False
    return True


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    """The one-line stderr of a refused command (exit 2), holding `words`."""
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [x for x in done.stderr.strip().splitlines() if " INFO " not in x]  # (a rank's log)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.mark.timeout(900)
def test_same_named_shards_never_share_an_entry_and_another_tower_is_refused(
    tmp_path: Path,
) -> None:
    """img2dataset names every dataset's shards `00000.tar`: two sources once shared one
    cache entry (the second "already extracted", training read source A twice). A cache
    made with other weights or another transform was kept and its index renamed; it is now
    refused (exit 2, one line) by `extract` and by training, unless `--overwrite`."""
    import torch
    from safetensors.torch import save_file

    from setdiv.data.features import cache_name, cached_shards
    from setdiv.data.vocab import Vocab

    with tarfile.open(CC12M) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members})
    sources = {"a": set(keys[:16]), "b": set(keys[16:])}
    for name, mine in sources.items():
        (tmp_path / name).mkdir()
        with tarfile.open(tmp_path / name / "00000.tar", "w") as sink:
            for m, data in members:
                if m.name.split(".", 1)[0] in mine:
                    sink.addfile(m, io.BytesIO(data))
    Vocab.build(["a photo"]).save(tmp_path / "vocab.json")
    cache = tmp_path / "cache"
    base = ["extract", *common(tmp_path), "--out", str(cache), "--data"]
    first = run_setdiv(*base, str(tmp_path / "a/00000.tar"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_setdiv(*base, str(tmp_path / "b/00000.tar"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 of 1 shard(s) to do" in second.stdout  # not "already extracted"
    index = json.loads((cache / "features-index.json").read_text())
    assert index["num_samples"] == 32 and len(index["shards"]) == 2  # both extractions
    for name, mine in sources.items():
        entry = Path(cached_shards(cache, str(tmp_path / name / "00000.tar")))
        assert entry.name == cache_name(tmp_path / name / "00000.tar")
        with tarfile.open(entry) as tar:
            assert {m.name.split(".", 1)[0] for m in tar} == mine, name
    # Another tower's weights: refused before anything is touched, then --overwrite.
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    torch.manual_seed(1)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "o.safetensors"
    )
    again = [
        *base,
        str(tmp_path / "a/00000.tar"),
        f"model.image.weights={tmp_path / 'o.safetensors'}",
    ]
    one_line_error(run_setdiv(*again), "another tower", "weights_sha256", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    crop = [*base, str(tmp_path / "a/00000.tar"), "data.crop_pct=1.0"]
    one_line_error(run_setdiv(*crop), "data.crop_pct 0.9 (asked: 1.0)")
    # Training from the cache with the other weights is refused the same way.
    train = [
        "train", *common(tmp_path), f"data.train_shards={tmp_path / 'a/00000.tar'}",
        "data.batch_size=8", "data.num_workers=1", "data.train_transform=test",
        f"data.features={cache}", f"model.image.weights={tmp_path / 'o.safetensors'}",
        "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    one_line_error(run_setdiv(*train), "another tower", "weights_sha256")
    replaced = run_setdiv(*again, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    record = json.loads((cache / "cache.json").read_text())
    assert (
        record["weights_sha256"]
        == hashlib.sha256((tmp_path / "o.safetensors").read_bytes()).hexdigest()
    )
    assert len(json.loads((cache / "features-index.json").read_text())["shards"]) == 1
    # A corrupt completion record, an --out that is a file, no weights: one line, exit 2.
    done = next(cache.glob("*.done"))
    done.write_text('{"samples": 1')
    one_line_error(run_setdiv(*again), "corrupt extraction record", done.name)
    (tmp_path / "file").write_text("x")
    no_dir = ["extract", *common(tmp_path), "--out", str(tmp_path / "file"), "--data"]
    one_line_error(run_setdiv(*no_dir, str(tmp_path / "a/00000.tar")), "is a file")
    null = [*base, str(tmp_path / "a/00000.tar"), "model.image.weights=null"]
    one_line_error(run_setdiv(*null), "model.image.weights' is null")
