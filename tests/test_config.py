"""Typed config: YAML deltas, dotted overrides, errors naming the key, round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from setdiv import config as config_lib

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    """The dotted keys and values a YAML mapping sets."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out |= _leaves(value, f"{prefix}{key}.")
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_with_the_values_its_file_sets(path: Path) -> None:
    """Each shipped config loads, and every key its YAML sets (read with PyYAML, not our
    loader) has that value in the loaded config: nothing dropped, renamed or coerced away."""
    import yaml

    names = {p.name for p in CONFIGS}
    assert {"roi_bigru.yaml", "resnet_bigru.yaml", "resnext_bert.yaml", "demo.yaml"} <= names
    cfg = OmegaConf.structured(config_lib.load([path]))
    leaves = _leaves(yaml.safe_load(path.read_text()))
    assert len(leaves) >= 5, leaves
    for key, value in leaves.items():
        loaded = OmegaConf.select(cfg, key)
        loaded = OmegaConf.to_container(loaded) if OmegaConf.is_config(loaded) else loaded
        if isinstance(value, float) or isinstance(loaded, float):
            assert loaded == pytest.approx(value), (path.name, key)
        else:
            assert loaded == value, (path.name, key, loaded, value)


def test_paper_recipes() -> None:
    root = Path(__file__).parents[1] / "configs"
    roi = config_lib.load([root / "roi_bigru.yaml"])
    assert (roi.data.batch_size, roi.train.epochs, roi.loss.margin) == (200, 80, 0.2)
    assert (roi.optim.lr, roi.optim.schedule, roi.optim.lr_mult["image_set"]) == (
        1e-3,
        "cosine",
        0.1,
    )
    assert (roi.model.image_set.num_embeds, roi.model.image_set.num_iters) == (4, 4)
    bert = config_lib.load([root / "resnext_bert.yaml"])
    assert (bert.data.batch_size, bert.train.epochs, bert.optim.lr) == (128, 50, 1e-4)
    assert bert.model.image.freeze_bn and bert.loss.mean_negative_epochs == 1
    resnet = config_lib.load([root / "resnet_bigru.yaml"])
    assert (resnet.optim.freeze_epochs, resnet.train.epochs) == (50, 120)


def test_defaults_yaml_deltas_and_overrides_merge_in_order(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("model:\n  embed_dim: 64\n  image_set: {num_embeds: 2}\nloss: {margin: 0.3}\n")
    b = tmp_path / "b.yaml"
    b.write_text("model:\n  embed_dim: 128\n")
    cfg = config_lib.load([a, b], ["loss.margin=0.5", "similarity.name=chamfer"])
    assert cfg.model.embed_dim == 128  # b after a
    assert cfg.model.image_set.num_embeds == 2  # from a, untouched by b
    assert cfg.model.text_set.num_embeds == 4  # default
    assert cfg.loss.margin == 0.5 and cfg.similarity.name == "chamfer"


def test_unknown_key_in_file_names_file_and_dotted_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  image_set:\n    num_embedz: 3\n")
    with pytest.raises(config_lib.ConfigError, match=r"bad\.yaml.*model\.image_set\.num_embedz"):
        config_lib.load([bad])


def test_wrong_type_names_dotted_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("similarity:\n  alpha: sixteen\n")
    with pytest.raises(config_lib.ConfigError, match=r"similarity\.alpha"):
        config_lib.load([bad])
    with pytest.raises(config_lib.ConfigError, match=r"model\.embed_dim"):
        config_lib.load([], ["model.embed_dim=1.5"])


def test_bad_override_and_bad_choice() -> None:
    with pytest.raises(config_lib.ConfigError, match="dotted.key=value"):
        config_lib.load([], ["model.embed_dim"])
    with pytest.raises(config_lib.ConfigError, match=r"train\.nope"):
        config_lib.load([], ["train.nope=1"])
    with pytest.raises(config_lib.ConfigError, match=r"similarity\.name"):
        config_lib.load([], ["similarity.name=cosine"])
    with pytest.raises(config_lib.ConfigError, match=r"train\.zero_stage"):
        config_lib.load([], ["train.zero_stage=4"])


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load([tmp_path / "nope.yaml"])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(config_lib.ConfigError, match="mapping"):
        config_lib.load([lst])


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(config_lib.ConfigError):
        config_lib.load([evil])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_resolved_config_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = config_lib.load([path], ["optim.betas=[0.8,0.95]", "model.text.bert_global=max"])
    saved = config_lib.save(cfg, tmp_path / "run" / "config.yaml")
    again = config_lib.load([saved])
    assert again == cfg
    assert again.optim.betas == (0.8, 0.95)


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.keep_last=0", "train.keep_last"),
        ("train.log_every=0", "train.log_every"),
        ("data.eval_batch_size=0", "data.eval_batch_size"),
        ("optim.step_epochs=0", "optim.step_epochs"),
        ("data.word_dropout=1.5", "data.word_dropout"),
        ("model.text_set.num_heads=0", "model.text_set.num_heads"),
        ("model.image_set.name=gru", "model.image_set.name"),
        ("data.val_protocol=cxc", "data.val_protocol"),
    ],
)
def test_bad_values_fail_at_load_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.load([], [override])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=nan", "optim.lr"),
        ("similarity.alpha=inf", "similarity.alpha"),
        ("optim.betas=[0.9,nan]", "optim.betas.1"),
        ("optim.lr_mult.image_head=-inf", "optim.lr_mult.image_head"),
        ("model.image.name=resnet50", "model.image.name"),
        ("model.text.name=gpt2", "model.text.name"),
    ],
)
def test_non_finite_numbers_and_unknown_encoders_fail_at_load(override: str, key: str) -> None:
    with pytest.raises(config_lib.ConfigError, match=f"'{re.escape(key)}'"):
        config_lib.load([], [override])


def test_encoder_choices_are_the_registries() -> None:
    from setdiv.model.encoders import IMAGE_ENCODERS, TEXT_ENCODERS

    assert set(config_lib._CHOICES["model.image.name"]) == set(IMAGE_ENCODERS)
    assert set(config_lib._CHOICES["model.text.name"]) == set(TEXT_ENCODERS)


# --- names and choices live in the types (issue 12) ---------------------------------------------

REGISTRIES = [
    ("similarity.name", "setdiv.similarity", "SIMILARITIES"),
    ("model.image_set.name", "setdiv.model.set_modules", "SET_MODULES"),
    ("model.text_set.name", "setdiv.model.set_modules", "SET_MODULES"),
    ("model.image.name", "setdiv.model.encoders", "IMAGE_ENCODERS"),
    ("model.text.name", "setdiv.model.encoders", "TEXT_ENCODERS"),
    ("model.text.tokenizer", "setdiv.data.vocab", "TOKENIZERS"),
    ("loss.name", "setdiv.losses", "OBJECTIVES"),
    ("loss.negatives", "setdiv.losses", "NEGATIVES"),
]
"""Every config key that names a registry entry, and the registry it names."""


def nested_yaml(key: str, value: str) -> str:
    """`a.b.c`, `v` -> "a:\\n  b:\\n    c: v\\n"."""
    *sections, leaf = key.split(".")
    lines = [f"{'  ' * depth}{name}:" for depth, name in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{leaf}: {value}"]) + "\n"


@pytest.mark.parametrize(("key", "module", "registry"), REGISTRIES, ids=lambda v: str(v))
def test_an_unregistered_name_in_a_file_fails_at_load_listing_the_registry(
    key: str, module: str, registry: str, tmp_path: Path
) -> None:
    import importlib

    names = list(getattr(importlib.import_module(module), registry))
    assert names
    bad = tmp_path / "bad.yaml"
    bad.write_text(nested_yaml(key, "not_registered"))
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load([bad])
    msg = str(err.value)
    assert str(bad) in msg and f"'{key}'" in msg and "not_registered" in msg
    assert all(f"'{name}'" in msg for name in names), (msg, names)
    # Every registered name loads (the type and the registry agree both ways).
    for name in names:
        bad.write_text(nested_yaml(key, name))
        assert OmegaConf.select(OmegaConf.structured(config_lib.load([bad])), key) == name


@pytest.mark.parametrize("key", sorted(config_lib._CHOICES))
def test_every_choice_key_rejects_other_values_listing_its_choices(key: str) -> None:
    choices = config_lib._CHOICES[key]
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.load([], [f"{key}=not_a_choice"])
    msg = str(err.value)
    assert f"bad config key '{key}': 'not_a_choice' is not one of" in msg
    assert all(repr(c) in msg for c in choices)


def test_range_and_conflict_errors_name_the_key() -> None:
    with pytest.raises(config_lib.ConfigError, match=r"'model\.image_set\.dropout': must be in"):
        config_lib.load([], ["model.image_set.dropout=1.0"])
    with pytest.raises(config_lib.ConfigError, match=r"'optim\.lr_mult': multipliers must be"):
        config_lib.load([], ["optim.lr_mult.text_set=-1"])
    with pytest.raises(config_lib.ConfigError, match=r"'model\.text\.vocab_size': .*vocab_path"):
        config_lib.load([], ["model.text.vocab_path=v.json", "model.text.vocab_size=10"])
    with pytest.raises(config_lib.ConfigError, match=r"'train\.zero_stage': 4 is not one of"):
        config_lib.load([], ["train.zero_stage=4"])


def test_config_errors_are_user_errors() -> None:
    from setdiv.errors import UserError

    assert issubclass(config_lib.ConfigError, UserError)
    assert config_lib.ConfigError("x").exit_code == 2


def test_the_configs_registry_names_are_the_registries() -> None:
    """The config spells the registries' names out (so it imports no torch): the same names,
    in the same order, as the registries the models and tokenizers are built from."""
    from typing import get_args

    from setdiv.data.vocab import TOKENIZERS
    from setdiv.model.encoders import IMAGE_ENCODERS, TEXT_ENCODERS
    from setdiv.model.set_modules import SET_MODULES
    from setdiv.similarity import SIMILARITIES

    assert get_args(config_lib.SimilarityName) == tuple(SIMILARITIES)
    assert get_args(config_lib.SetModuleName) == tuple(SET_MODULES)
    assert get_args(config_lib.ImageEncoderName) == tuple(IMAGE_ENCODERS)
    assert get_args(config_lib.TextEncoderName) == tuple(TEXT_ENCODERS)
    assert get_args(config_lib.TokenizerName) == tuple(TOKENIZERS)


def test_loading_a_config_imports_no_torch_and_no_other_setdiv_module() -> None:
    """`python -X importtime`: importing setdiv.config and loading every shipped config loads
    neither torch nor numpy, and no setdiv module but setdiv.errors (which imports nothing)."""
    import subprocess
    import sys

    code = (
        "import glob, setdiv.config as c\n"
        "for f in sorted(glob.glob('configs/*.yaml')): c.load([f])\n"
    )
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "omegaconf" in modules  # (the parse found the import lines)
    assert not {m for m in modules if m.split(".")[0] in ("torch", "numpy", "nltk")}
    assert {m for m in modules if m.split(".")[0] == "setdiv"} == {
        "setdiv", "setdiv.config", "setdiv.config.schema", "setdiv.config.loading",
        "setdiv.config.objective", "setdiv.config.rules", "setdiv.config.model",
        "setdiv.config.data", "setdiv.config.training", "setdiv.errors",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "key", "why"),
    [
        (["loss.hn_beta=0.5"], "loss.hn_beta", "loss.name=infonce only"),
        (["loss.temperature=0.05"], "loss.temperature", "loss.name=infonce only"),
        (["loss.learn_temperature=false"], "loss.learn_temperature", "infonce only"),
        (["loss.name=infonce", "loss.negatives=hardest"], "loss.negatives", "triplet only"),
        (["loss.name=infonce", "loss.temperature=0.001"], "loss.temperature", "scale = 0.01"),
        (["loss.name=infonce", "loss.temperature=2"], "loss.temperature", "(0, 1]"),
        (["train.collapse.ratio=0.6"], "train.collapse.recover_ratio", "must be above"),
        (["train.collapse.window=0"], "train.collapse.window", "> 0"),
        (["data.caption_noise=1.5"], "data.caption_noise", "[0, 1]"),
    ],
)
def test_objective_keys_that_do_not_apply_or_do_not_fit_fail_naming_the_key(
    overrides: list[str], key: str, why: str
) -> None:
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"'{key}'")) as err:
        config_lib.load([], overrides)
    assert why in str(err.value)


def test_objective_defaults_and_the_official_objective_in_one_override() -> None:
    cfg = config_lib.load([])
    assert (cfg.loss.name, cfg.loss.negatives, cfg.loss.mean_negative_epochs) == (
        "triplet", "selective", 0,
    )  # fmt: skip
    # the official objective: hardest negatives from the first step (ROI, ResNet), after one
    # epoch of mean negatives (ResNeXt + BERT), each one override away from the recipe
    for recipe, warm_up in (("roi_bigru", 0), ("resnet_bigru", 0), ("resnext_bert", 1)):
        cfg = config_lib.load([ROOT / f"configs/{recipe}.yaml"])
        assert (cfg.loss.name, cfg.loss.negatives) == ("triplet", "selective")
        official = config_lib.load([ROOT / f"configs/{recipe}.yaml"], ["loss.negatives=hardest"])
        assert official.loss.negatives == "hardest"
        assert official.loss.mean_negative_epochs == warm_up
