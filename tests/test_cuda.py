"""The model math on a CUDA device against CPU references: similarities, the loss and its
gradients, and every tower family in fp32 and bf16. Marked `cuda`; `tools/gpu_check.sh` runs
them on the GPU machine. Without a CUDA device they skip; `SETDIV_TEST_DEVICE=cpu` runs them
on the CPU instead (a dry run of the code, not of CUDA)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import register_tiny_clip
from test_similarity import naive

from setdiv import config as config_lib
from setdiv import similarity as sim
from setdiv.config import LossConfig
from setdiv.losses import build_loss
from setdiv.model import build_model
from setdiv.model.set_modules import SetOutput

DEVICE = os.environ.get("SETDIV_TEST_DEVICE", "cuda")
ROOT = Path(__file__).parents[1]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="no CUDA device here (tools/gpu_check.sh runs these on a GPU; "
        "SETDIV_TEST_DEVICE=cpu runs them on the CPU)",
    ),
]


def unit_sets(n: int, k: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("name", sorted(sim.SIMILARITIES))
def test_similarities_on_the_device_equal_the_naive_loop(name: str) -> None:
    x, y = unit_sets(12, 4, 32, 0), unit_sets(20, 3, 32, 1)
    ref = torch.from_numpy(naive(name, x.numpy(), y.numpy()))
    fn = sim.get(name)
    got = fn(x.float().to(DEVICE), y.float().to(DEVICE)).cpu().double()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    got_bf16 = fn(x.bfloat16().to(DEVICE), y.bfloat16().to(DEVICE)).cpu().double()
    torch.testing.assert_close(got_bf16, ref, atol=3e-2, rtol=0)


def test_blockwise_smooth_chamfer_at_scale_on_the_device_equals_the_cpu() -> None:
    """Shapes that take many blocks (a 1000 x 6000 slice of the COCO 5K x 25K matrix)."""
    x, y = unit_sets(1000, 4, 64, 2), unit_sets(6000, 4, 64, 3)
    ref = sim.get("smooth_chamfer")(x, y)  # float64 on the CPU (checked against naive there)
    got = sim.get("smooth_chamfer")(x.float().to(DEVICE), y.float().to(DEVICE))
    torch.testing.assert_close(got.cpu().double(), ref, atol=1e-4, rtol=0)
    assert got.argmax(dim=1).cpu().eq(ref.argmax(dim=1)).float().mean() > 0.99


def test_loss_and_its_gradients_on_the_device_equal_the_cpu() -> None:
    img, img_slots = unit_sets(8, 4, 32, 4), torch.randn(8, 4, 32, dtype=torch.float64)
    txt, txt_slots = unit_sets(40, 4, 32, 5), torch.randn(40, 4, 32, dtype=torch.float64)

    def run(device: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        leaves = [
            t.detach().to(device, dtype, copy=True).requires_grad_()
            for t in (img, img_slots, txt, txt_slots)
        ]
        loss = build_loss(LossConfig(), sim.get("smooth_chamfer"))
        terms = loss(SetOutput(leaves[0], leaves[1]), SetOutput(leaves[2], leaves[3]))
        sum(terms.values()).backward()
        return {k: v.detach().cpu().double() for k, v in terms.items()}, [
            t.grad.cpu().double() for t in leaves
        ]

    ref_terms, ref_grads = run("cpu", torch.float64)
    terms, grads = run(DEVICE, torch.float32)
    assert terms.keys() == ref_terms.keys()
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], atol=1e-5, rtol=1e-5, msg=k)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def tower_overrides(tower: str, tmp_path: Path) -> list[str]:
    if tower == "timm":
        return ["model.image.name=timm", "model.image.arch=vit_tiny_patch16_224"]
    if tower == "open_clip":
        pytest.importorskip("open_clip")
        register_tiny_clip(tmp_path, "setdiv-cuda-clip", text_layers=2)
        return [
            "model.image.name=open_clip", "model.image.arch=setdiv-cuda-clip",
            "model.text.name=open_clip", "model.text.arch=setdiv-cuda-clip",
            "model.text.vocab_size=null",
        ]  # fmt: skip
    if tower == "bert":
        from transformers import BertConfig, BertModel

        BertModel(
            BertConfig(
                vocab_size=50,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
            )  # fmt: skip
        ).save_pretrained(tmp_path / "bert")
        return [
            "model.text.name=bert", f"model.text.bert_path={tmp_path / 'bert'}",
            "model.text.vocab_size=null",
        ]  # fmt: skip
    return []  # the demo: regions + bi-GRU


@pytest.mark.parametrize("tower", ["demo", "timm", "open_clip", "bert"])
def test_towers_on_the_device_match_the_cpu_in_fp32_and_bf16(tmp_path: Path, tower: str) -> None:
    """Image and caption sets from the device equal the CPU's in fp32 (TF32 convolutions
    allowed for), stay within a few degrees of them in bf16, and a bf16 backward gives every
    trained parameter a finite gradient."""
    torch.manual_seed(0)
    cfg = config_lib.load(
        [ROOT / "configs/demo.yaml"],
        ["model.embed_dim=32", "model.image.dropout=0", "model.text.dropout=0",
         *tower_overrides(tower, tmp_path)],
    )  # fmt: skip
    cpu = build_model(cfg.model).eval()
    region = cfg.model.image.name == "region"
    size = 224 if tower == "timm" else 32
    g = torch.Generator().manual_seed(0)
    if region:
        images = torch.randn(3, 6, cfg.model.image.feature_dim, generator=g)
        image_mask = torch.ones(3, 6, dtype=torch.bool)
    else:
        images, image_mask = torch.randn(3, 3, size, size, generator=g), None
    ids = torch.randint(5, 50, (6, 9), generator=g)
    ids[:, 0] = 1
    text_mask = torch.ones_like(ids, dtype=torch.bool)
    text_mask[2, 5:] = False
    ids = ids.masked_fill(~text_mask, 0)
    if tower == "open_clip":  # CLIP pools at its end-of-text id, the largest
        ids[:, 0], ids[torch.arange(6), text_mask.sum(1) - 1] = 49406, 49407

    def sets(model: torch.nn.Module, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        def put(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device, dtype) if t.is_floating_point() else t.to(device)

        img, txt = model(put(images), put(image_mask), put(ids), put(text_mask))
        return img.embeds, txt.embeds

    with torch.no_grad():
        ref = sets(cpu, "cpu", torch.float32)
        dev = copy.deepcopy(cpu).to(DEVICE)
        got = sets(dev, DEVICE, torch.float32)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a.cpu(), b, atol=5e-3, rtol=0)
        half = copy.deepcopy(cpu).to(DEVICE, torch.bfloat16)
        for a, b in zip(sets(half, DEVICE, torch.bfloat16), ref, strict=True):
            assert a.dtype == torch.bfloat16
            cosine = (a.float().cpu() * b).sum(-1)
            assert cosine.min() > 0.98, (tower, cosine.min())
    half.train()
    img, txt = sets(half, DEVICE, torch.bfloat16)
    (img.float().square().sum() + txt.float().sum()).backward()
    trained = [(n, p) for n, p in half.named_parameters() if p.requires_grad]
    assert trained
    assert all(p.grad is None or torch.isfinite(p.grad).all() for _, p in trained)
    assert sum(p.grad is not None for _, p in trained) > len(trained) // 2
