"""The official recipe's optimizer side, through the real DeepSpeed engine: parameter groups and
their LRs for each paper config, freezing that takes gradients and optimizer state away under
ZeRO 0-3, and mixed precision as autocast over fp32 weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import write_data

from setdiv import config as config_lib
from setdiv.distributed import process_group, spawn_local
from setdiv.model import build_model
from setdiv.train.optim import param_groups
from setdiv.train.trainer import Trainer

ROOT = Path(__file__).parents[1]
pytestmark = [pytest.mark.timeout(300)]

# --- groups ------------------------------------------------------------------------------------

RANDOM_INIT = [
    "model.image.weights=null",
    "model.text.glove_path=null",
    "model.text.bert_path=null",
    "model.embed_dim=32",
    "model.text.hidden_dim=32",
    "model.image_set.head_dim=8",
    "model.text_set.head_dim=8",
]

# Official train.py: img_enc minus its CNN and the image set module at lr x img_pie_lr_scale
# (0.1), the CNN at lr (x0.1 for ResNeXt-WSL, "CNN lr scaled down"), the text encoder with
# BERT at lr x txt_lr_scale (1), the text set module at lr x txt_pie_lr_scale (0.1).
EXPECTED_LR = {
    "roi_bigru": {
        "image_encoder.head.fc": 1e-4,
        "image_encoder.head.bn": 1e-4,
        "image_encoder.head.fc2": 1e-4,
        "image_set": 1e-4,
        "text_encoder.embed": 1e-3,
        "text_encoder.gru": 1e-3,
        "text_set": 1e-4,
    },
    "resnet_bigru": {
        "image_encoder.backbone": 1e-3,
        "image_encoder.head": 1e-4,
        "image_set": 1e-4,
        "text_encoder.embed": 1e-3,
        "text_encoder.gru": 1e-3,
        "text_set": 1e-4,
    },
    "resnext_bert": {
        "image_encoder.backbone": 1e-5,
        "image_encoder.head": 1e-5,
        "image_set": 1e-5,
        "text_encoder.backbone": 1e-4,  # BERT sits with the text encoder
        "text_encoder.proj": 1e-4,
        "text_set": 1e-5,
    },
}
EXPECTED_FROZEN = {"roi_bigru": (0, []), "resnet_bigru": (50, ["image_backbone"])}
EXPECTED_FROZEN["resnext_bert"] = (1, ["image_backbone"])  # the CNN only, not BERT


@pytest.mark.parametrize("name", sorted(EXPECTED_LR))
def test_paper_config_groups_and_learning_rates(name: str) -> None:
    vocab = ["model.text.vocab_path=null", "model.text.vocab_size=50"] if "bigru" in name else []
    cfg = config_lib.load([ROOT / f"configs/{name}.yaml"], [*RANDOM_INIT, *vocab])
    model = build_model(cfg.model)
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg.optim) for p in g["params"]}
    assert len(lr_of) == len(list(model.parameters()))  # every parameter, exactly once
    for module_name, lr in EXPECTED_LR[name].items():
        params = list(model.get_submodule(module_name).parameters())
        assert params and all(lr_of[id(p)] == pytest.approx(lr) for p in params), module_name
    assert (cfg.optim.freeze_epochs, cfg.optim.freeze_groups or []) == EXPECTED_FROZEN[name] or (
        cfg.optim.freeze_epochs == 0 and EXPECTED_FROZEN[name][0] == 0
    )


def test_unknown_group_names_fail_naming_the_key() -> None:
    with pytest.raises(config_lib.ConfigError, match="optim.lr_mult.*image_bakcbone"):
        config_lib.load([], ["optim.lr_mult.image_bakcbone=0.1"])
    with pytest.raises(config_lib.ConfigError, match="optim.freeze_groups"):
        config_lib.load([], ["optim.freeze_groups=[cnn]"])


# --- the engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data(tmp_path_factory.mktemp("recipe"), train=64)


def _config(data: Path, *extra: str) -> config_lib.Config:
    return config_lib.load(
        [ROOT / "configs/demo.yaml"],
        [
            f"model.text.vocab_path={data / 'vocab.json'}",
            "model.text.vocab_size=null",
            f"data.train_shards={data}/train-*.tar",
            "data.batch_size=32",
            "data.num_workers=0",
            "data.shuffle_buffer=1",
            "data.region_dropout=0",
            "data.word_dropout=0",
            "model.image.dropout=0",
            "model.text.dropout=0",
            "train.log_every=1",
            "train.precision=fp32",
            *extra,
        ],
    )


def _inner(engine: object) -> torch.optim.Optimizer:
    opt = engine.optimizer  # type: ignore[attr-defined]
    return getattr(opt, "optimizer", opt)


def _check_freeze(cfg: config_lib.Config, run_dir: Path) -> None:
    """In a fresh process (DeepSpeed keeps global state per process): train, recording what
    the inner torch AdamW sees at each step. For ZeRO 1-3 its param groups hold the flat fp32
    partitions, for ZeRO 0 the parameters themselves."""
    with process_group():
        trainer = Trainer(cfg, run_dir)
        inner = _inner(trainer.engine)
        # ZeRO 1-3 step one group at a time (the others absent or emptied for the call).
        frozen = {"image_head", "text_encoder"}
        assert frozen <= {g["name"] for g in inner.param_groups}
        seen: dict[tuple[int, str], tuple[float, bool]] = {}
        adam_steps: dict[str, set[int]] = {}
        step = inner.step

        def recording_step(*args: object, **kwargs: object) -> object:
            groups = [(g["name"], list(g["params"])) for g in inner.param_groups if g["params"]]
            before = {n: [p.detach().clone() for p in ps] for n, ps in groups}
            grad_sq = {
                n: sum(float(p.grad.float().square().sum()) for p in ps if p.grad is not None)
                for n, ps in groups
            }
            out = step(*args, **kwargs)
            for n, ps in groups:
                moved = any(
                    not torch.equal(a, p.detach()) for a, p in zip(before[n], ps, strict=True)
                )
                seen[(trainer.state.step, n)] = (grad_sq[n], moved)
                adam_steps[n] = {int(inner.state[p]["step"]) for p in ps if p in inner.state}
            return out

        inner.step = recording_step  # type: ignore[method-assign]
        trainer.train()
        for name in adam_steps:
            for k in range(4):
                grad_sq, moved = seen.get((k, name), (0.0, False))
                if name in frozen and k < 2:  # frozen: no gradient (so none in the clip norm)
                    assert grad_sq == 0.0 and not moved, f"step {k}: {name} frozen but updated"
                else:
                    assert grad_sq > 0 and moved, f"step {k}: {name} not updated"
            # Unfrozen state started fresh: 2 Adam steps, where the other groups took 4.
            want = {2} if name in frozen else {4}
            assert adam_steps[name] == want, f"{name}: Adam steps {adam_steps[name]}"
        assert len(adam_steps) == 4


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_frozen_group_gets_no_gradient_no_update_and_fresh_state(
    data: Path, tmp_path: Path, stage: int
) -> None:
    """freeze_groups for the first epoch (2 steps), then 2 steps unfrozen, under ZeRO 0-3."""
    cfg = _config(
        data,
        f"train.zero_stage={stage}",
        "train.epochs=2",
        "optim.freeze_epochs=1",
        "optim.freeze_groups=[image_head,text_encoder]",
        "optim.grad_clip=0.5",
    )
    spawn_local(_check_freeze, 1, cfg, tmp_path / "run")


def _check_precision(
    fp32: config_lib.Config, mixed: config_lib.Config, run_dir: Path, steps: int
) -> None:
    with process_group():
        runs = {}
        for name, cfg in (("fp32", fp32), ("mixed", mixed)):
            torch.manual_seed(0)
            trainer = Trainer(cfg, run_dir / name)
            out: list[float] = []
            for batch in trainer.reader.epoch(0):
                result = trainer.train_step(batch)
                assert result is not None
                out.append(result["loss"])
            for batch in trainer.reader.epoch(1):
                out.append(trainer.train_step(batch)["loss"])  # type: ignore[index]
            runs[name] = out[:steps]
        # The loss, similarities and LayerNorms run in fp32; bf16 matmuls keep 8 bits.
        np.testing.assert_allclose(runs["mixed"], runs["fp32"], rtol=0.02)
        assert runs["fp32"][-1] < runs["fp32"][0]  # it learns
        assert trainer.engine.torch_autocast_enabled()
        assert all(p.dtype == torch.float32 for p in trainer.engine.module.parameters())
        inner = _inner(trainer.engine)
        states = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
        assert states and all(t.dtype == torch.float32 for t in states if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "stage"), [("bf16", 0), ("bf16", 2), ("fp16", 0)])
def test_mixed_precision_is_autocast_over_fp32_weights(
    data: Path, tmp_path: Path, precision: str, stage: int
) -> None:
    """4 steps: the autocast run's losses stay within 2% of fp32 training while parameters and
    optimizer state stay fp32."""
    extra = [f"train.zero_stage={stage}"]
    mixed = _config(data, *extra, f"train.precision={precision}")
    spawn_local(_check_precision, 1, _config(data, *extra), mixed, tmp_path, 4)


def test_half_weights_is_a_separate_setting() -> None:
    from setdiv.train.engine import deepspeed_config

    cfg = config_lib.load([], ["train.precision=bf16"])
    auto = deepspeed_config(cfg.train, cfg.optim, 8)
    assert auto["torch_autocast"]["dtype"] == "bfloat16" and "bf16" not in auto
    half = config_lib.load([], ["train.precision=bf16", "train.half_weights=true"])
    assert deepspeed_config(half.train, half.optim, 8)["bf16"] == {"enabled": True}
    with pytest.raises(config_lib.ConfigError, match="half_weights"):
        config_lib.load([], ["train.precision=fp32", "train.half_weights=true"])


def test_margin_stall_counts_whole_epochs_at_the_margin() -> None:
    from setdiv.train.watch import MarginStall

    stall = MarginStall(margin=0.2, reduction="mean")
    for i2t, t2i in ((0.21, 0.195), (0.2, 0.2), (0.219, 0.181)):  # all within 10% of 0.2
        stall.update({"i2t_loss": i2t, "t2i_loss": t2i, "mmd_loss": 0.0})
    assert stall.whole_epoch() and stall.mean("i2t_loss") == pytest.approx((0.21 + 0.2 + 0.219) / 3)
    stall.update({"i2t_loss": 0.15, "t2i_loss": 0.2})  # one step that learned something
    assert not stall.whole_epoch()
    assert not MarginStall(0.2, "sum").enabled and not MarginStall(0.0, "mean").enabled


def _check_margin_warning(cfg: config_lib.Config, run_dir: Path) -> None:
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("setdiv.train.trainer").addHandler(handler)
    with process_group():
        trainer = Trainer(cfg, run_dir)
        loss_fn = trainer.loss_fn

        class AtMargin:
            def __call__(self, img: object, txt: object, **kw: object) -> dict:
                terms = loss_fn(img, txt, **kw)  # keeps the graph; values pinned at 0.2
                return {k: v - v.detach() + (0.2 if "2" in k else 0.0) for k, v in terms.items()}

            def __getattr__(self, name: str) -> object:  # the real batch's similarities, ...
                return getattr(loss_fn, name)

        trainer.loss_fn = AtMargin()
        trainer.train()
    warned = [r for r in records if "sat at the margin" in r]
    assert len(warned) == 1 and "epoch 0" in warned[0] and "mean_negative_epochs" in warned[0]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spreads = [r["sim_std"] for r in logged if "sim_std" in r]
    assert spreads and all(0.0 < s < 2.0 for s in spreads)
    said = float(warned[0].split("standard deviation in a batch: ")[1].split(")")[0])
    assert min(spreads) - 1e-4 <= said <= max(spreads) + 1e-4  # the epoch's mean of them


def test_trainer_warns_when_the_triplet_sits_at_the_margin_for_an_epoch(
    data: Path, tmp_path: Path
) -> None:
    spawn_local(_check_margin_warning, 1, _config(data, "train.epochs=1"), tmp_path / "run")
