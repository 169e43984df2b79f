"""Set modules, encoders and the full model: shapes, norms, gradients, padding, weights files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import register_tiny_clip, tiny_config
from torch import nn

from setdiv.config import SetModuleConfig
from setdiv.errors import UserError
from setdiv.model import IMAGE_ENCODERS, SET_MODULES, TEXT_ENCODERS, build_model
from setdiv.model.encoders import build_image_encoder, build_text_encoder
from setdiv.model.set_modules import build_set_module


def assert_all_params_get_grad(module: nn.Module, loss: torch.Tensor) -> None:
    module.zero_grad()
    loss.backward()
    missing = [
        n
        for n, p in module.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [
        n
        for n, p in module.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"non-finite gradients: {bad}"


def check_set(embeds: torch.Tensor, B: int, K: int, D: int) -> None:
    assert embeds.shape == (B, K, D)
    assert torch.isfinite(embeds).all()
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(B, K), atol=1e-5, rtol=0)


@pytest.fixture
def bert_dir(tmp_path: Path) -> str:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


# --- set modules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SET_MODULES))
def test_set_module_shapes_norms_grads(name: str) -> None:
    cfg = SetModuleConfig(
        name=name, num_embeds=3, num_iters=2, num_heads=2, head_dim=4, dropout=0.1
    )
    module = build_set_module(cfg, dim_in=6, dim=8)
    B, R = 4, 7
    local = torch.randn(B, R, 6)
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[1, 5:] = False
    out = module(local, mask, torch.randn(B, 8), torch.randn(R, 6))
    check_set(out.embeds, B, 3, 8)
    assert out.slots.shape == (B, 3, 8)
    assert out.attn and all(torch.isfinite(a).all() for a in out.attn)
    assert_all_params_get_grad(module, out.embeds.sum() + out.slots.sum())


@pytest.mark.parametrize("name", sorted(SET_MODULES))
def test_padded_inputs_get_zero_attention(name: str) -> None:
    cfg = SetModuleConfig(name=name, num_embeds=3, num_iters=2, num_heads=2, head_dim=4)
    module = build_set_module(cfg, dim_in=6, dim=8).eval()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    out = module(torch.randn(2, 5, 6), mask, torch.randn(2, 8), None)
    for attn_BHKR in out.attn:
        assert attn_BHKR[0, ..., 3:].abs().max() == 0
        torch.testing.assert_close(
            attn_BHKR.sum(-1), torch.ones_like(attn_BHKR.sum(-1)), atol=1e-5, rtol=0
        )


def test_slot_attention_competes_over_slots() -> None:
    """Before renormalisation each input's weights sum to 1 over slots: check via one iteration."""
    cfg = SetModuleConfig(num_embeds=3, num_iters=1, num_heads=1, head_dim=4, dropout=0.0)
    module = build_set_module(cfg, dim_in=6, dim=8).eval()
    local = torch.randn(1, 5, 6)
    mask = torch.ones(1, 5, dtype=torch.bool)
    out = module(local, mask, torch.randn(1, 8), None)
    attn = module.attn
    q = attn.to_q(module.norm_slots(module.slots))[None]
    k = attn.to_k(module.norm_inputs(local))
    ref = (q @ k.transpose(1, 2) * attn.scale).softmax(dim=1)  # softmax over slots
    ref = ref / (ref.sum(-1, keepdim=True) + 1e-7)
    torch.testing.assert_close(out.attn[0][:, 0], ref)


def test_transformer_variant_softmaxes_over_inputs() -> None:
    cfg = SetModuleConfig(name="transformer", num_embeds=3, num_iters=1, num_heads=1, head_dim=4)
    module = build_set_module(cfg, dim_in=6, dim=8).eval()
    local = torch.randn(1, 5, 6)
    out = module(local, torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 8), None)
    attn = module.attn
    q = attn.to_q(module.norm_slots(module.slots))[None]
    k = attn.to_k(module.norm_inputs(local))
    torch.testing.assert_close(
        out.attn[0][:, 0], (q @ k.transpose(1, 2) * attn.scale).softmax(dim=-1)
    )


def test_weights_are_shared_across_iterations() -> None:
    cfg = SetModuleConfig(num_embeds=2, num_iters=1, num_heads=1, head_dim=4)
    one = sum(p.numel() for p in build_set_module(cfg, 6, 8).parameters())
    cfg.num_iters = 5
    assert sum(p.numel() for p in build_set_module(cfg, 6, 8).parameters()) == one


def test_unknown_set_module() -> None:
    with pytest.raises(ValueError, match="registered"):
        build_set_module(SetModuleConfig(name="gru"), 4, 4)


# --- encoders ---------------------------------------------------------------------------------


def image_input(name: str, B: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if name == "region":
        mask = torch.ones(B, 6, dtype=torch.bool)
        mask[0, 4:] = False
        return torch.randn(B, 6, 12), mask
    return torch.randn(B, 3, 64, 64), None


def text_input(B: int, vocab: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab, (B, 9))
    mask = torch.ones(B, 9, dtype=torch.bool)
    mask[1, 4:] = False
    ids[~mask] = 0
    return ids, mask


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny open_clip model config, registered under its name for this process."""

    pytest.importorskip("open_clip")
    return register_tiny_clip(
        tmp_path_factory.mktemp("open_clip"),
        "setdiv-test-clip",
        image_size=64,
        width=32,
        patch_size=16,
        embed_dim=16,
        head_width=16,
    )


TOWER_ARCH = {"timm": "convnext_atto"}
"""Small architectures for the tower encoders (open_clip: `tiny_clip`)."""


@pytest.mark.parametrize("name", sorted(IMAGE_ENCODERS))
def test_image_encoders(name: str, request: pytest.FixtureRequest) -> None:
    arch = request.getfixturevalue("tiny_clip") if name == "open_clip" else TOWER_ARCH.get(name)
    cfg = tiny_config(f"model.image.name={name}", *([f"model.image.arch={arch}"] if arch else []))
    model = build_model(cfg.model).train()
    images, mask = image_input(name, 2)
    out = model.encode_image(images, mask)
    check_set(out.embeds, 2, 4, 16)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # freeze_bn defaults to off; a timm tower freezes what its token grid does not use.
    unused = {f"image_encoder.{n}" for n in getattr(model.image_encoder, "unused", [])}
    assert frozen == unused
    assert_all_params_get_grad(model.image_encoder, out.embeds.square().sum())


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_text_encoders(name: str, bert_dir: str, request: pytest.FixtureRequest) -> None:
    extra = (
        [f"model.text.arch={request.getfixturevalue('tiny_clip')}"] if name == "open_clip" else []
    )
    cfg = tiny_config(f"model.text.name={name}", f"model.text.bert_path={bert_dir}", *extra)
    model = build_model(cfg.model).train()
    ids, mask = text_input(3)
    out = model.encode_text(ids, mask)
    check_set(out.embeds, 3, 4, 16)
    assert_all_params_get_grad(model.text_encoder, out.embeds.square().sum())


def test_full_model_every_parameter_gets_gradient() -> None:
    model = build_model(tiny_config().model).train()
    img = model.encode_image(*image_input("region", 3))
    txt = model.encode_text(*text_input(3))
    assert_all_params_get_grad(
        model, (img.embeds.sum(1) * txt.embeds.sum(1)).sum() + img.slots.sum()
    )


@pytest.mark.parametrize("text", sorted(TEXT_ENCODERS))
def test_caption_embedding_does_not_depend_on_batch_padding(
    text: str, bert_dir: str, request: pytest.FixtureRequest
) -> None:
    clip = text == "open_clip"
    extra = [f"model.text.arch={request.getfixturevalue('tiny_clip')}"] if clip else []

    def embed(compat: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        cfg = tiny_config(
            f"model.text.name={text}",
            f"model.text.bert_path={bert_dir}",
            f"model.text_set.compat_mask={compat}",
            *extra,
        )
        model = build_model(cfg.model).eval()
        short = torch.tensor([[1, 7, 9, 11, 2]])
        alone = model.encode_text(short, torch.ones_like(short, dtype=torch.bool)).embeds[0]
        batch = torch.zeros(3, 12, dtype=torch.long)
        mask = torch.zeros(3, 12, dtype=torch.bool)
        batch[0, :5], mask[0, :5] = short[0], True
        batch[1], mask[1] = torch.randint(5, 40, (12,)), True
        batch[2, :8], mask[2, :8] = torch.randint(5, 40, (8,)), True
        padded = model.encode_text(batch, mask).embeds[0]
        return alone, padded

    alone, padded = embed(compat=False)
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)
    alone_c, padded_c = embed(compat=True)
    assert (padded_c - alone_c).abs().max() > 1e-4


def test_region_padding_does_not_change_image_embedding() -> None:
    model = build_model(tiny_config().model).eval()
    regions = torch.randn(1, 4, 12)
    alone = model.encode_image(regions, torch.ones(1, 4, dtype=torch.bool)).embeds
    padded = torch.cat([regions, torch.randn(1, 3, 12)], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    torch.testing.assert_close(model.encode_image(padded, mask).embeds, alone, atol=1e-6, rtol=0)


def test_frozen_batchnorm_stays_frozen() -> None:
    cfg = tiny_config("model.image.name=resnet152", "model.image.freeze_bn=true")
    enc = build_image_encoder(cfg.model.image, 16).train()
    bn = enc.backbone[1]
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training and not bn.weight.requires_grad
    before = bn.running_mean.clone()
    enc(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(bn.running_mean, before)


# --- weights from local files -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_cnn_weights_load_from_local_file(tmp_path: Path, suffix: str) -> None:
    ref = torchvision.models.resnet152(weights=None)
    state = ref.state_dict()
    path = tmp_path / f"resnet152{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    cfg = tiny_config("model.image.name=resnet152", f"model.image.weights={path}")
    enc = build_image_encoder(cfg.model.image, 16)
    torch.testing.assert_close(enc.backbone[0].weight, ref.conv1.weight)
    torch.testing.assert_close(enc.backbone[7][2].conv3.weight, ref.layer4[2].conv3.weight)


def test_missing_weight_files_name_the_config_key(tmp_path: Path) -> None:
    nope = tmp_path / "nope"
    cases = {
        "model.image.weights": ["model.image.name=resnet152", f"model.image.weights={nope}.pth"],
        "model.text.bert_path": ["model.text.name=bert", f"model.text.bert_path={nope}"],
        "model.text.glove_path": [f"model.text.glove_path={nope}.txt"],
    }
    for key, overrides in cases.items():
        with pytest.raises(FileNotFoundError, match=key.replace(".", r"\.")):
            build_model(tiny_config(*overrides).model)
    with pytest.raises(FileNotFoundError, match=r"model\.text\.vocab_path"):
        build_model(tiny_config(f"model.text.vocab_path={nope}.json").model)


def test_mismatched_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    cfg = tiny_config("model.image.name=resnet152", f"model.image.weights={path}")
    with pytest.raises((ValueError, RuntimeError), match="model.image.weights|size mismatch"):
        build_image_encoder(cfg.model.image, 16)


def test_glove_vectors_initialise_word_embeddings(tmp_path: Path) -> None:
    from setdiv.data.vocab import Vocab

    vocab = Vocab.build(["a red circle", "a blue square"])
    vocab_path = tmp_path / "vocab.json"
    vocab.save(vocab_path)
    glove = tmp_path / "glove.txt"
    glove.write_text("red 1 2 3 4 5 6 7 8\nzebra 0 0 0 0 0 0 0 0\nsquare -1 -1 -1 -1 -1 -1 -1 -1\n")
    cfg = tiny_config(f"model.text.vocab_path={vocab_path}", f"model.text.glove_path={glove}")
    enc = build_text_encoder(cfg.model.text, 16)
    assert enc.embed.num_embeddings == len(vocab)
    torch.testing.assert_close(enc.embed.weight[vocab.stoi["red"]], torch.arange(1.0, 9.0))
    torch.testing.assert_close(enc.embed.weight[vocab.stoi["square"]], -torch.ones(8))


def test_sync_masked_batchnorm_matches_batchnorm_in_one_process() -> None:
    from setdiv.model.layers import SyncMaskedBatchNorm

    ours, ref = SyncMaskedBatchNorm(6), nn.BatchNorm1d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref.load_state_dict(ours.state_dict())
    x1 = (torch.randn(40, 6) * 3 + 1).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    for _ in range(3):
        torch.testing.assert_close(ours(x1), ref(x2), atol=1e-5, rtol=1e-5)
    (ours(x1) ** 3).sum().backward()
    (ref(x2) ** 3).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x1), ref(x2))


def test_pienet_official_init_and_bert_hidden_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Official PIE-Net: xavier-uniform w_1, w_2 (attention MLP) and fc; with BERT text the
    attention MLP's hidden width is word_dim // 2 (model_spm.py), otherwise d_in // 2."""
    import math

    from setdiv.model import encoders
    from setdiv.model.set_modules import PIENet

    model = build_model(
        tiny_config("model.image_set.name=pienet", "model.text_set.name=pienet").model
    )
    pie = model.image_set
    assert isinstance(pie, PIENet) and pie.w1.out_features == pie.w1.in_features // 2
    for linear in (pie.w1, pie.w2, pie.fc):
        fan_out, fan_in = linear.weight.shape
        xavier = math.sqrt(6 / (fan_in + fan_out))  # default nn.Linear: 1 / sqrt(fan_in)
        top = float(linear.weight.detach().abs().max())
        assert 0.75 * xavier < top <= xavier, (linear, top, xavier)

    class StandInBert(torch.nn.Module):  # BERT itself does not matter here: only its width
        backbone = None

        def __init__(self, cfg: object, dim: int, pretrained: bool = True) -> None:
            super().__init__()
            self.local_dim = dim

    monkeypatch.setitem(encoders.TEXT_ENCODERS, "bert", StandInBert)
    cfg = tiny_config(
        "model.text.name=bert", "model.text_set.name=pienet", "model.text.word_dim=300"
    )
    assert build_model(cfg.model).text_set.w1.out_features == 150  # word_dim 300 // 2


def _tiny_hf(arch: str) -> object:
    import transformers

    common = dict(vocab_size=60, pad_token_id=0, max_position_embeddings=40)
    return {
        "bert": lambda: transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            **common,
        ),
        "distilbert": lambda: transformers.DistilBertConfig(
            dim=32, n_layers=1, n_heads=2, hidden_dim=64, **common
        ),
        "roberta": lambda: transformers.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            **common,
        ),
        "electra": lambda: transformers.ElectraConfig(
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            **common,
        ),
    }[arch]()


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "electra"])
def test_any_hugging_face_encoder_directory_is_a_text_tower(tmp_path: Path, arch: str) -> None:
    """`model.text.bert_path` takes any encoder AutoModel builds: the saved weights are the ones
    loaded (no pooler), token states of every real token reach the set, padding changes nothing."""
    from transformers import AutoModel

    AutoModel.from_config(_tiny_hf(arch)).save_pretrained(tmp_path / arch)
    saved = AutoModel.from_pretrained(tmp_path / arch).state_dict()
    cfg = tiny_config("model.text.name=bert", f"model.text.bert_path={tmp_path / arch}")
    enc = build_text_encoder(cfg.model.text, 16)
    loaded = enc.backbone.state_dict()
    assert loaded and not any("pooler" in k for k in loaded)
    for k, v in loaded.items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    random_arch = build_text_encoder(cfg.model.text, 16, pretrained=False).backbone.state_dict()
    assert random_arch.keys() == loaded.keys()
    assert any(not torch.equal(random_arch[k], loaded[k]) for k in loaded)

    model = build_model(cfg.model).eval()
    short = torch.tensor([[2, 7, 9, 11, 3]])
    alone = model.encode_text(short, torch.ones_like(short, dtype=torch.bool)).embeds[0]
    batch, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.bool)
    batch[0, :5], mask[0, :5] = short[0], True
    batch[1], mask[1] = torch.randint(5, 60, (9,)), True
    out = model.encode_text(batch, mask)
    check_set(out.embeds, 2, 4, 16)
    torch.testing.assert_close(out.embeds[0], alone, atol=1e-5, rtol=0)
    assert_all_params_get_grad(
        model.train().text_encoder, model.encode_text(batch, mask).embeds.square().sum()
    )


def test_an_encoder_decoder_directory_is_refused_naming_the_key(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=60).save_pretrained(
        tmp_path
    )
    cfg = tiny_config("model.text.name=bert", f"model.text.bert_path={tmp_path}")
    with pytest.raises(UserError, match=r"'model.text.bert_path'.*encoder-decoder model \(t5\)"):
        build_text_encoder(cfg.model.text, 16)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert_as_decoder"])
def test_a_decoder_only_directory_is_refused_naming_the_key(tmp_path: Path, arch: str) -> None:
    """GPT-2 was accepted as the text tower (causal attention: each token sees only those
    before it, and its first token knows nothing of the caption); decoder-only language
    models are refused as encoder-decoders are, and an encoder (BERT) still builds."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    made = {
        "gpt2": GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=60),
        "llama": LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=60,
        ),
        "bert_as_decoder": BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            vocab_size=60, is_decoder=True,
        ),
    }  # fmt: skip
    made[arch].save_pretrained(tmp_path / arch)
    cfg = tiny_config("model.text.name=bert", f"model.text.bert_path={tmp_path / arch}")
    kind = made[arch].model_type
    with pytest.raises(UserError, match=rf"bert_path'.*decoder-only language model \({kind}\)"):
        build_text_encoder(cfg.model.text, 16)
