"""Pretrained towers by registry name (timm), from files the tests write: shapes, weights,
parameter groups, and the tower's own preprocessing."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import register_tiny_clip
from PIL import Image

from setdiv import config as config_lib
from setdiv.data.samples import sample_options
from setdiv.errors import UserError
from setdiv.model import build_model
from setdiv.model.towers import with_tower_preprocessing
from setdiv.train.optim import group_parameters

timm = pytest.importorskip("timm")
ROOT = Path(__file__).parents[1]


def tower_config(tmp_path: Path, arch: str, *extra: str) -> config_lib.Config:
    return config_lib.load(
        [ROOT / "configs/demo.yaml"],
        [
            "model.image.name=timm", f"model.image.arch={arch}", "model.text.vocab_size=50",
            "model.embed_dim=32", *extra,
        ],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "tokens", "width"), [("vit_tiny_patch16_224", 196, 192), ("convnext_atto", 49, 320)]
)
def test_timm_tower_shapes_weights_and_groups(
    tmp_path: Path, arch: str, tokens: int, width: int
) -> None:
    """The tower's token grid (ViT patches without CLS, convnet cells) reaches the set module;
    weights come from a file (safetensors), and a wrong or missing file is one error naming
    the key; the tower is the image_backbone group."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    cfg = tower_config(tmp_path, arch, f"model.image.weights={tmp_path / 'w.safetensors'}")
    model = build_model(cfg.model).eval()
    tower = model.image_encoder.backbone
    for k, v in ref.state_dict().items():
        assert torch.equal(tower.state_dict()[k], v), k
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.image_encoder(x)
        own = ref.forward_features(x)
    assert feats.local.shape == (2, tokens, 32) and feats.mask.all()
    own_tokens = own[:, ref.num_prefix_tokens :] if own.ndim == 3 else own.flatten(2).mT
    assert own_tokens.shape == (2, tokens, width)
    torch.testing.assert_close(
        feats.local, model.image_encoder.head(own_tokens, feats.mask), atol=1e-5, rtol=1e-5
    )
    assert model.encode_image(x).embeds.shape == (2, cfg.model.image_set.num_embeds, 32)
    groups = group_parameters(model)
    assert {id(p) for p in groups["image_backbone"]} == {id(p) for p in tower.parameters()}
    # Wrong weights, missing file: one error naming the key.
    other = "resnet18" if arch != "resnet18" else "vit_tiny_patch16_224"
    wrong = timm.create_model(other, pretrained=False, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in wrong.items()}, tmp_path / "wrong.safetensors")
    with pytest.raises(UserError, match="'model.image.weights'.*does not fit"):
        build_model(
            tower_config(tmp_path, arch, f"model.image.weights={tmp_path}/wrong.safetensors").model
        )
    with pytest.raises(FileNotFoundError, match="'model.image.weights'"):
        build_model(tower_config(tmp_path, arch, f"model.image.weights={tmp_path}/none.pth").model)
    with pytest.raises(UserError, match="'model.image.arch'.*not a timm model"):
        build_model(tower_config(tmp_path, "no_such_net").model)


def test_preprocessing_is_the_towers_own(tmp_path: Path) -> None:
    """The data config's null keys take the ViT's pretrained config (mean 0.5, std 0.5,
    bicubic, crop 0.9), which the export then carries; the evaluation pixels of a photo equal
    timm's own eval transform of it (to resampling differences); set keys win."""
    cfg = with_tower_preprocessing(tower_config(tmp_path, "vit_tiny_patch16_224"))
    own = timm.data.resolve_data_config({}, model=timm.create_model("vit_tiny_patch16_224"))
    assert cfg.data.image_mean == own["mean"] and cfg.data.image_std == own["std"]
    assert cfg.data.interpolation == own["interpolation"] == "bicubic"
    assert cfg.data.crop_pct == own["crop_pct"] == 0.9
    kept = with_tower_preprocessing(
        tower_config(tmp_path, "vit_tiny_patch16_224", "data.crop_pct=1.0")
    )
    assert kept.data.crop_pct == 1.0 and kept.data.image_mean == own["mean"]
    with pytest.raises(UserError, match="data.image_size=224"):
        with_tower_preprocessing(
            tower_config(tmp_path, "vit_tiny_patch16_224", "data.image_size=96")
        )
    # Pixels: a smooth random picture (upsampled noise), 840 x 600.
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((30, 42, 3)) * 255).astype(np.uint8)).resize((840, 600))
    from timm.data import create_transform

    ref = create_transform(**own)(photo)  # (3, 224, 224), normalised by timm
    opts = sample_options(cfg.data, "image", None, train=False, augment=False)  # type: ignore[arg-type]
    from setdiv.data.samples import image_file_pixels

    buf = io.BytesIO()
    photo.save(buf, "PNG")
    ours = image_file_pixels(io.BytesIO(buf.getvalue()), 224, "crop", opts)[0]
    assert ours.shape == ref.shape
    # Same crop and normalisation: tensor vs PIL bicubic resampling differ a little.
    assert (ours - ref).abs().mean() < 0.05, (ours - ref).abs().mean()
    cnn = sample_options(
        config_lib.load([ROOT / "configs/demo.yaml"], []).data, "image", None, False, False
    )  # type: ignore[arg-type]
    plain = image_file_pixels(io.BytesIO(buf.getvalue()), 224, "crop", cnn)[0]
    assert (plain - ref).abs().mean() > 0.2  # ImageNet normalisation is visibly different


def test_open_clip_vision_tower_from_a_whole_clip_checkpoint(tmp_path: Path) -> None:
    """A tiny open_clip config registered by the test: the vision tower is loaded from a whole
    CLIP checkpoint's `visual.*` entries, gives its patch tokens to the set module, and the
    data config takes open_clip's own preprocessing, whose pixels match open_clip's eval
    transform."""

    open_clip = pytest.importorskip("open_clip")
    register_tiny_clip(tmp_path, "setdiv-tiny-vit")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    clip = open_clip.create_model("setdiv-tiny-vit", pretrained=None)
    weights = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(weights, tmp_path / "clip.safetensors")
    cfg = with_tower_preprocessing(
        config_lib.load(
            [ROOT / "configs/demo.yaml"],
            [
                "model.image.name=open_clip", "model.image.arch=setdiv-tiny-vit",
                f"model.image.weights={tmp_path / 'clip.safetensors'}",
                "model.text.vocab_size=50", "model.embed_dim=32", "data.image_size=32",
            ],
        )
    )  # fmt: skip
    model = build_model(cfg.model).eval()
    tower = model.image_encoder.backbone
    for k, v in clip.visual.state_dict().items():
        assert torch.equal(tower.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.image_encoder(x)
    assert feats.local.shape == (2, 16, 32) and feats.pooled.shape == (2, 32)
    assert model.encode_image(x).embeds.shape == (2, cfg.model.image_set.num_embeds, 32)
    own = open_clip.get_model_preprocess_cfg(clip)
    assert cfg.data.image_mean == tuple(own["mean"]) and cfg.data.image_std == tuple(own["std"])
    assert cfg.data.interpolation == own["interpolation"] and cfg.data.crop_pct == 1.0
    rng = np.random.default_rng(1)
    photo = Image.fromarray((rng.random((12, 9, 3)) * 255).astype(np.uint8)).resize((90, 120))
    ref = open_clip.image_transform(32, is_train=False, mean=own["mean"], std=own["std"])(photo)
    buf = io.BytesIO()
    photo.save(buf, "PNG")
    from setdiv.data.samples import image_file_pixels

    opts = sample_options(cfg.data, "image", None, train=False, augment=False)  # type: ignore[arg-type]
    ours = image_file_pixels(io.BytesIO(buf.getvalue()), 32, "crop", opts)[0]
    assert ours.shape == ref.shape and (ours - ref).abs().mean() < 0.05


def test_open_clip_text_tower_and_tokenizer(tmp_path: Path) -> None:
    """The text tower of the same tiny CLIP: captions tokenised by open_clip's own BPE up to
    end-of-text, token states equal to CLIP's own text encoder at the end-of-text token
    (its projection aside), whatever the padding; word dropout is refused (no mask token)."""

    open_clip = pytest.importorskip("open_clip")
    register_tiny_clip(tmp_path, "setdiv-tiny-txt", text_layers=2)
    from safetensors.torch import save_file

    from setdiv.data.loaders import build_train_reader
    from setdiv.data.text import build_tokenizer

    torch.manual_seed(0)
    clip = open_clip.create_model("setdiv-tiny-txt", pretrained=None).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "c.safetensors")
    cfg = config_lib.load(
        [ROOT / "configs/demo.yaml"],
        [
            "model.text.name=open_clip", "model.text.arch=setdiv-tiny-txt",
            f"model.text.weights={tmp_path / 'c.safetensors'}", "model.text.vocab_size=null",
            "model.embed_dim=32",
        ],
    )  # fmt: skip
    tok = build_tokenizer(cfg.model.text)
    captions = ["a dog on a skateboard", "two cats"]
    own = open_clip.get_tokenizer("setdiv-tiny-txt")(captions)  # (2, 16), zero-padded
    ids = [tok.encode(c) for c in captions]
    assert ids[0] == own[0][: len(ids[0])].tolist() and ids[0][-1] == 49407
    assert own[0][len(ids[0]) :].eq(0).all()
    model = build_model(cfg.model).eval()
    clip.text_projection = None  # CLIP's own pooled state, before its projection
    with torch.no_grad():
        ref = clip.encode_text(own)  # (2, 32)
        for width in (16, max(map(len, ids))):  # context-length padding, or just enough
            batch = torch.zeros(2, width, dtype=torch.long)
            for i, row in enumerate(ids):
                batch[i, : len(row)] = torch.tensor(row)
            states = model.text_encoder.states(batch)
            eot = torch.tensor([len(r) - 1 for r in ids])
            torch.testing.assert_close(states[torch.arange(2), eot], ref, atol=1e-5, rtol=1e-5)
        mask = batch > 0
        mask[:, 0] = True
        assert model.encode_text(batch, mask).embeds.shape == (2, cfg.model.text_set.num_embeds, 32)
    with pytest.raises(UserError, match="'data.word_dropout'.*no mask token"):
        build_train_reader(dataclasses.replace(cfg.data, word_dropout=0.2), "regions", tok, 0, 1, 0)


def test_vit_setheads_recipe_builds_with_the_clip_preprocessing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`configs/vit_setheads.yaml`: an open_clip ViT-B/16 (both towers, frozen) under K=4 set
    heads, CLIP's preprocessing filled in; `setdiv info` lists the frozen tower groups."""
    pytest.importorskip("open_clip")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from setdiv import cli

    cfg = with_tower_preprocessing(config_lib.load([ROOT / "configs/vit_setheads.yaml"], []))
    assert cfg.data.image_mean == OPENAI_DATASET_MEAN and cfg.data.image_std == OPENAI_DATASET_STD
    assert (cfg.data.interpolation, cfg.data.crop_pct, cfg.data.image_size) == ("bicubic", 1.0, 224)
    assert cli.main(["info", str(ROOT / "configs/vit_setheads.yaml"), "--random-init"]) == 0
    out = capsys.readouterr().out
    assert "OpenClipImageEncoder" in out and "OpenClipTextEncoder" in out
    assert out.count("first 1000000 epoch(s)") == 2  # both towers frozen


@pytest.mark.parametrize("tower", ["timm", "open_clip_image", "bert", "open_clip_text"])
def test_gradient_checkpointing_recomputes_and_changes_no_gradient(
    tmp_path: Path, tower: str
) -> None:
    """With `grad_checkpointing` the tower's first block starts a forward again in the backward
    pass (it is really on), and the loss and every gradient equal those without it."""
    side = "text" if tower in ("bert", "open_clip_text") else "image"
    extra = []
    if tower == "timm":
        extra = ["model.image.name=timm", "model.image.arch=vit_tiny_patch16_224"]
    elif tower == "open_clip_image":
        pytest.importorskip("open_clip")
        register_tiny_clip(tmp_path, "setdiv-ckpt-vit")
        extra = ["model.image.name=open_clip", "model.image.arch=setdiv-ckpt-vit"]
    elif tower == "open_clip_text":
        pytest.importorskip("open_clip")
        register_tiny_clip(tmp_path, "setdiv-ckpt-txt", text_layers=2)
        extra = ["model.text.name=open_clip", "model.text.arch=setdiv-ckpt-txt",
                 "model.text.vocab_size=null", "data.word_dropout=0"]  # fmt: skip
    else:
        from transformers import BertConfig, BertModel

        BertModel(
            BertConfig(
                vocab_size=50,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
            )  # fmt: skip
        ).save_pretrained(tmp_path / "bert")
        extra = ["model.text.name=bert", f"model.text.bert_path={tmp_path / 'bert'}",
                 "model.text.vocab_size=null"]  # fmt: skip
    ids = torch.randint(5, 50, (2, 9))
    images = torch.randn(2, 3, 224 if tower == "timm" else 32, 224 if tower == "timm" else 32)

    def run(ckpt: bool) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        cfg = config_lib.load(
            [ROOT / "configs/demo.yaml"],
            ["model.embed_dim=32", "model.image.dropout=0", "model.text.dropout=0",
             *extra, f"model.{side}.grad_checkpointing={ckpt}"],
        )  # fmt: skip
        model = build_model(cfg.model).train()
        enc = model.text_encoder if side == "text" else model.image_encoder
        backbone = enc.backbone
        first = {
            "timm": lambda: backbone.blocks[0],
            "open_clip_image": lambda: backbone.transformer.resblocks[0],
            "bert": lambda: backbone.encoder.layer[0].attention,  # (recomputed below __call__)
            "open_clip_text": lambda: backbone.transformer.resblocks[0],
        }[tower]()
        calls = []
        first.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early
        if side == "text":
            out = model.encode_text(ids, torch.ones_like(ids, dtype=torch.bool))
        else:
            out = model.encode_image(images)
        loss = out.embeds.square().mul(torch.arange(out.embeds.numel()).view_as(out.embeds)).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
        return len(calls), loss.detach(), grads

    plain_calls, plain_loss, plain_grads = run(False)
    ckpt_calls, ckpt_loss, ckpt_grads = run(True)
    assert (plain_calls, ckpt_calls) == (1, 2)
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads and plain_grads.keys() == ckpt_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_bigru_encoder_refuses_checkpointing_naming_the_key() -> None:
    with pytest.raises(UserError, match="model.text.grad_checkpointing"):
        config_lib.load([ROOT / "configs/demo.yaml"], ["model.text.grad_checkpointing=true"])
