"""Vocabulary: building, JSON round trip, official pickles through a restricted unpickler."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import pytest

from setdiv.data.vocab import SPECIALS, Vocab, tokenize


def test_tokenize_lowercases_and_splits_punctuation() -> None:
    assert tokenize("A red circle, left of the dog's ball.") == [
        "a",
        "red",
        "circle",
        ",",
        "left",
        "of",
        "the",
        "dog's",
        "ball",
        ".",
    ]


def test_build_encode_and_json_round_trip(tmp_path: Path) -> None:
    vocab = Vocab.build(["a red circle", "a blue circle", "a red square"])
    assert vocab.itos[: len(SPECIALS)] == list(SPECIALS)
    assert vocab.itos[5:7] == ["a", "circle"]  # most frequent first
    assert vocab.encode("A red triangle") == [1, vocab.stoi["a"], vocab.stoi["red"], 3, 2]
    vocab.save(tmp_path / "v.json")
    again = Vocab.load(tmp_path / "v.json")
    assert again.itos == vocab.itos and again.mask == 4


def _official_pickle(tmp_path: Path, protocol: int) -> Path:
    """A pickle as the official code writes it: a `__main__.Vocabulary` with three attributes."""
    main = sys.modules["__main__"]
    cls = types.new_class("Vocabulary")
    cls.__module__ = "__main__"
    main.Vocabulary = cls
    try:
        obj = cls()
        words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "café"]
        obj.word2idx = {w: i for i, w in enumerate(words)}
        obj.idx2word = {i: w for i, w in enumerate(words)}
        obj.idx = len(words)
        path = tmp_path / "vocab.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    finally:
        delattr(main, "Vocabulary")
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_official_pickle_loads_without_its_class(tmp_path: Path, protocol: int) -> None:
    vocab = Vocab.load(_official_pickle(tmp_path, protocol))
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "dog", "café", "<mask>"]
    assert vocab.encode("dog") == [1, 4, 2]


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="refusing to load"):
        Vocab.load(path)


def test_bad_vocabularies() -> None:
    with pytest.raises(ValueError, match="must start with"):
        Vocab(["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocab([*SPECIALS, "a", "a"])
