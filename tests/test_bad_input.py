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
from setdiv.model.encoders import load_state_dict_file

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
