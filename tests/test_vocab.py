"""Vocabulary: building, JSON round trip, official pickles through a restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from nltk.tokenize import NLTKWordTokenizer

from setdiv import cli
from setdiv.data.shards import Sample, write_shards
from setdiv.data.vocab import SPECIALS, Vocab, build_from_shards, load_glove, tokenize


def test_regex_tokenizer_lowercases_and_splits_punctuation() -> None:
    assert tokenize("A red circle, left of the dog's ball.", "regex") == [
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


# Entries of the official coco_vocab.pkl / f30k_vocab.pkl, built by nltk.word_tokenize.
OFFICIAL_ENTRIES = ["'s", "n't", "t-shirt", "black-and-white", "mr.", "st.", "u.s."]


def test_nltk_tokenizer_splits_as_the_official_vocabularies() -> None:
    assert tokenize("A man's T-shirt isn't black-and-white.") == [
        "a",
        "man",
        "'s",
        "t-shirt",
        "is",
        "n't",
        "black-and-white",
        ".",
    ]
    # word_tokenize splits sentences first: an inner sentence's period is a token of its own,
    # while abbreviations stay whole (the official vocabularies hold "mr.", "st.", "u.s.").
    assert tokenize("Two dogs. A cat.") == ["two", "dogs", ".", "a", "cat", "."]
    assert tokenize("Mr. Smith on St. Mark's in the U.S.") == [
        "mr.",
        "smith",
        "on",
        "st.",
        "mark",
        "'s",
        "in",
        "the",
        "u.s",
        ".",
    ]
    assert tokenize('He said "hi"') == ["he", "said", "``", "hi", "''"]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenize("a", "spacy")


def test_encode_maps_nltk_tokens_to_their_entries() -> None:
    words = [*SPECIALS, "a", "man", "is", ".", *OFFICIAL_ENTRIES]
    vocab = Vocab(words)
    ids = vocab.encode("a man's t-shirt isn't black-and-white.")
    expected = ["a", "man", "'s", "t-shirt", "is", "n't", "black-and-white", "."]
    assert ids == [vocab.start, *(words.index(w) for w in expected), vocab.end]
    assert vocab.encode("A purple t-shirt") == [1, words.index("a"), 3, words.index("t-shirt"), 2]
    # The same vocabulary read through the regex tokenizer misses the split words.
    assert Vocab(words, tokenizer="regex").encode("man's") == [1, 3, 2]


def test_build_encode_and_json_round_trip(tmp_path: Path) -> None:
    vocab = Vocab.build(["a red circle", "a blue circle", "a red square"])
    assert vocab.itos[: len(SPECIALS)] == list(SPECIALS)
    assert vocab.itos[5:7] == ["a", "circle"]  # most frequent first
    assert vocab.encode("A red triangle") == [1, vocab.stoi["a"], vocab.stoi["red"], 3, 2]
    vocab.save(tmp_path / "v.json")
    again = Vocab.load(tmp_path / "v.json")
    assert again.itos == vocab.itos and again.mask == 4


def test_json_records_tokenizer_and_counts(tmp_path: Path) -> None:
    vocab = Vocab.build(["a dog's ball", "a dog"], tokenizer="nltk")
    assert vocab.counts == {"a": 2, "dog": 2, "'s": 1, "ball": 1}
    vocab.save(tmp_path / "v.json")
    again = Vocab.load(tmp_path / "v.json")
    assert (again.tokenizer, again.counts, again.itos) == ("nltk", vocab.counts, vocab.itos)
    regex = Vocab.build(["a dog's ball"], tokenizer="regex")
    assert regex.itos[len(SPECIALS) :] == ["a", "ball", "dog's"]
    regex.save(tmp_path / "r.json")
    assert Vocab.load(tmp_path / "r.json").tokenizer == "regex"
    # JSON written before the tokenizer was recorded: setdiv then always used the regex one.
    (tmp_path / "old.json").write_text(json.dumps({"words": list(SPECIALS)}))
    assert Vocab.load(tmp_path / "old.json").tokenizer == "regex"
    with pytest.raises(ValueError, match="unknown tokenizer"):
        Vocab.build(["a"], tokenizer="spacy")


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
    assert vocab.tokenizer == "nltk"  # the official vocab.py tokenises with nltk


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


# --- GloVe ------------------------------------------------------------------------------------


def _write_glove(path: Path, rows: dict[str, list[float]]) -> Path:
    lines = [" ".join([w, *(str(v) for v in vec)]) for w, vec in rows.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_glove_hits_fallbacks_and_misses_as_official(tmp_path: Path) -> None:
    rows = {
        "the": [0.5, -1.25, 2.0, 0.125],
        "tshirt": [1.0, 2.0, 3.0, 4.0],
        ". . .": [7.0, 7.0, 7.0, 7.0],  # glove.840B has a few words holding spaces
        "red": [-1.0, 0.0, 1.0, 0.5],
        "e-mail": [0.25, 0.25, 0.25, 0.25],
        "email": [9.0, 9.0, 9.0, 9.0],
        "nt": [3.0, 1.0, 4.0, 1.0],
        "<unk>": [8.0, 8.0, 8.0, 8.0],
    }
    glove = _write_glove(tmp_path / "glove.txt", rows)
    words = ["the", "t-shirt", "red/white", "e-mail", "n't", "blue/red", "o'clock"]
    missing = [f"nope{i}" for i in range(5000)]
    vocab = Vocab([*SPECIALS, *words, *missing])
    torch.manual_seed(0)
    weights, found = load_glove(glove, vocab, 4)
    assert weights.shape == (len(vocab), 4) and found == 5

    def row(w: str) -> list[float]:
        return weights[vocab.stoi[w]].tolist()

    assert row("the") == rows["the"]  # exact hit
    assert row("t-shirt") == rows["tshirt"]  # '-', '.', "'" dropped when the word misses
    assert row("n't") == rows["nt"]
    assert row("red/white") == rows["red"]  # then the part before the first '/'
    assert row("e-mail") == rows["e-mail"]  # a hit is never replaced by its fallback
    # Only the first '/' part is tried ("red" is in GloVe, "blue" is not): a miss.
    assert row("blue/red") != rows["red"]
    # Misses and special tokens keep nn.Embedding's N(0, 1) init.
    assert row("<unk>") != rows["<unk>"]
    miss = weights[[vocab.stoi[w] for w in missing]]
    assert abs(miss.std().item() - 1.0) < 0.03 and abs(miss.mean().item()) < 0.03
    specials = weights[: len(SPECIALS)]
    assert 0.3 < specials.std().item() < 2.0


def test_glove_width_mismatch(tmp_path: Path) -> None:
    glove = _write_glove(tmp_path / "glove.txt", {"the": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="3 values, expected 4"):
        load_glove(glove, Vocab([*SPECIALS, "the"]), 4)


# --- vocabulary from shards -------------------------------------------------------------------

SHARD_CAPTIONS = [
    "A man's T-shirt isn't black-and-white.",
    "Two dogs play in the grass.",
    "A dog's ball, red and white.",
    "The man isn't here",
    "A black-and-white photo of two dogs.",
]


def _write_train_shards(root: Path, n: int = 5) -> list[str]:
    samples = [
        Sample(
            str(100 + i),
            [f"{['one', 'two', 'three'][i % 3]}: {c}" for c in SHARD_CAPTIONS],
            list(range(5 * i, 5 * i + 5)),
            regions=np.zeros((2, 3), np.float32),
        )
        for i in range(n)
    ]
    write_shards(samples, root, "train", "regions", "test", shard_size=2)  # 3 shards
    return [c for s in samples for c in s.captions]


def _expected(captions: list[str], min_count: int) -> tuple[list[str], dict[str, int]]:
    """Words and counts as the official vocab.py gets them (all captions are one sentence)."""
    counts = Counter(w for c in captions for w in NLTKWordTokenizer().tokenize(c.lower()))
    kept = {w: n for w, n in counts.items() if n >= min_count}
    return sorted(kept, key=lambda w: (-kept[w], w)), kept


def test_vocab_subcommand_counts_training_captions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    captions = _write_train_shards(tmp_path / "data")
    out = tmp_path / "vocab.json"
    pattern = str(tmp_path / "data" / "train-*.tar")
    assert cli.main(["vocab", "--shards", pattern, "--out", str(out), "--min-count", "6"]) == 0
    data = json.loads(out.read_text())
    words, counts = _expected(captions, 6)
    assert "n't" in words and "black-and-white" in words and "three" not in words
    assert data["tokenizer"] == "nltk"
    assert data["words"] == [*SPECIALS, *words]
    assert data["counts"] == counts
    printed = capsys.readouterr().out
    assert f"{len(SPECIALS) + len(words)} entries" in printed and str(out) in printed
    assert Vocab.load(out).encode("isn't")[1:-1] == [data["words"].index(w) for w in ("is", "n't")]


def test_build_from_shards_expands_braces_like_the_reader(tmp_path: Path) -> None:
    captions = _write_train_shards(tmp_path)
    vocab = build_from_shards(str(tmp_path / "train-{000000..000001}.tar"), 1, "regex")
    counts = Counter(w for c in captions[:20] for w in tokenize(c, "regex"))  # 4 of 5 images
    assert vocab.tokenizer == "regex" and vocab.counts == dict(counts)
    # "two" heads image 1's captions (image 4 is in shard 2) and is in 2 captions of every image
    assert vocab.counts["two"] == 5 + 2 * 4
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        build_from_shards(str(tmp_path / "val-*.tar"))
