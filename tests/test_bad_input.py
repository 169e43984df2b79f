"""Files users hand us that are wrong: each gets one clear error naming the file (and the config
key), exit code 2 from the CLI, and nothing is executed or half-loaded."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from setdiv import cli
from setdiv.data.shards import ShardIndex
from setdiv.data.vocab import Vocab
from setdiv.model.weights import load_state_dict_file

ROOT = Path(__file__).parents[1]


class Gadget:
    """Any class: a checkpoint holding one is not weights-only."""

    def __init__(self) -> None:
        self.payload = [1, 2]


def test_weights_file_that_is_not_weights_only_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Gadget()}, path)
    with pytest.raises(ValueError, match="config key 'model.image.weights'") as err:
        load_state_dict_file(path, "model.image.weights")
    text = str(err.value)
    assert str(path) in text and "not a weights-only checkpoint" in text
    assert "weights_only=False" not in text and "unsafe" not in text.lower()
    # Through the CLI: a one-line error and exit code 2.
    args = ["info", str(ROOT / "configs/resnet_bigru.yaml"), f"model.image.weights={path}"]
    args += ["model.text.vocab_path=null", "model.text.vocab_size=50", "model.text.glove_path=null"]
    assert cli.main(args) == 2
    err_text = capsys.readouterr().err
    assert "setdiv info: error: config key 'model.image.weights'" in err_text
    assert "weights_only=False" not in err_text


def test_truncated_and_damaged_weights_files(tmp_path: Path) -> None:
    good = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(1000)}, str(good))
    blob = good.read_bytes()
    for name, data in (("cut.safetensors", blob[: len(blob) // 2]), ("hdr.safetensors", b"xx")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"'k': .*{name} is not a readable safetensors"):
            load_state_dict_file(tmp_path / name, "k")
    torch.save({"w": torch.ones(1000)}, tmp_path / "w.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "w.pt").read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.pt is not a weights-only checkpoint"):
        load_state_dict_file(cut, "k")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        load_state_dict_file(tmp_path / "list.pt", "k")


@pytest.mark.parametrize(
    "blob",
    [
        # Vocabulary(1, 2): the one allowed class, called with arguments it does not take.
        b"c__main__\nVocabulary\n(I1\nI2\ntR.",
        # Its state set to something that is not a dict.
        b"c__main__\nVocabulary\n)\x81N(I1\nI2\nlb.",
        # idx2word keys that are not ids.
        pickle.dumps({"idx2word": {"a": "b"}}),
        b"\x80\x04garbage",
    ],
    ids=["reduce-args", "build-state", "bad-ids", "garbage"],
)
def test_vocab_pickles_with_bad_contents_name_the_file(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "vocab.pkl"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=f"{path}: "):
        Vocab.load(path)


def test_malformed_shard_index_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train-index.json"
    cases = {
        "{not json": "not a JSON shard index",
        "[1, 2]": "not a setdiv shard index",
        json.dumps({"format": "setdiv-shards/1", "split": "train"}): "no 'shards' entry",
        json.dumps(
            {"format": "setdiv-shards/1", "split": "t", "kind": "regions", "source": "s",
             "shards": [{"name": "a.tar"}]}
        ): "malformed shard index",
    }  # fmt: skip
    for text, expected in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=expected) as err:
            ShardIndex.load(path)
        assert str(path) in str(err.value)
    (tmp_path / "train-000000.tar").write_bytes(b"")
    assert cli.main(["vocab", "--shards", f"{tmp_path}/train-*.tar", "--out", "v.json"]) == 2
    assert f"{path}: malformed shard index" in capsys.readouterr().err


def _refused_by_info(capsys: pytest.CaptureFixture[str], overrides: list[str], *words: str) -> None:
    """`setdiv info` (which loads the towers' weights) exits 2 with one line holding `words`."""
    assert cli.main(["info", str(ROOT / "configs/demo.yaml"), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [x for x in err if "WARNING" not in x and "Loading weights" not in x]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    assert lines[0].startswith("setdiv info: error:") and all(w in lines[0] for w in words), lines


def test_tower_weights_of_another_width_or_vocabulary_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A timm checkpoint of another width (ViT-S weights, ViT-Ti model) and an open_clip text
    checkpoint of another vocabulary size were torch's multi-line size-mismatch traceback."""
    timm = pytest.importorskip("timm")
    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    weights = tmp_path / "s.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, weights)
    _refused_by_info(capsys, [
        "model.image.name=timm", "model.image.arch=vit_tiny_patch16_224",
        f"model.image.weights={weights}", "model.text.vocab_size=50",
    ], "'model.image.weights'", "s.safetensors does not fit vit_tiny_patch16_224",
       "another shape", "(384,)")  # fmt: skip
    open_clip = pytest.importorskip("open_clip")
    from conftest import register_tiny_clip

    register_tiny_clip(tmp_path, "setdiv-vocab-txt")
    state = open_clip.create_model("setdiv-vocab-txt", pretrained=None).state_dict()
    state["token_embedding.weight"] = torch.zeros(1000, 32)  # another tokenizer's vocabulary
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "c.safetensors")
    _refused_by_info(capsys, [
        "model.text.name=open_clip", "model.text.arch=setdiv-vocab-txt",
        f"model.text.weights={tmp_path / 'c.safetensors'}", "model.text.vocab_size=null",
    ], "'model.text.weights'", "token_embedding.weight (1000, 32)")  # fmt: skip


def test_bert_directories_without_usable_weights_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`model.text.bert_path` empty, with a config but no weights, or with a truncated
    `model.safetensors`: transformers' tracebacks (ValueError, OSError, SafetensorError)."""
    from transformers import BertConfig, BertModel

    good = tmp_path / "good"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, vocab_size=100)).save_pretrained(good)  # fmt: skip
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights/config.json").write_text((good / "config.json").read_text())
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut/config.json").write_text((good / "config.json").read_text())
    blob = (good / "model.safetensors").read_bytes()
    (tmp_path / "cut/model.safetensors").write_bytes(blob[: len(blob) // 2])
    capsys.readouterr()  # (save_pretrained's progress bar)
    for name, words in (
        ("empty", ["has no config.json"]),
        ("noweights", ["weights cannot be read"]),
        ("cut", ["weights cannot be read", "Safetensor"]),
    ):
        path = tmp_path / name
        overrides = ["model.text.name=bert", f"model.text.bert_path={path}"]
        _refused_by_info(capsys, overrides, "'model.text.bert_path'", str(path), *words)
