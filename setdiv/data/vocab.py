"""Word vocabulary for the bi-GRU text encoder, GloVe vectors, and caption tokenisation.

Vocabularies are exchanged as JSON (`Vocab.save` / `Vocab.load`). The official DivE / VSE
vocabulary pickles are read through a restricted unpickler that only accepts their
`Vocabulary` class and plain containers, so loading one never executes code.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["SPECIALS", "Vocab", "load_glove", "tokenize"]

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>", "<mask>")
"""Fixed ids 0..4; the first four match the official vocab pickles."""

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens: runs of letters/digits (with a trailing 's-style clitic) and
    single punctuation marks."""
    return _TOKEN.findall(caption.lower())


class Vocab:
    """Word <-> id mapping with `<pad>=0, <start>=1, <end>=2, <unk>=3, <mask>=4`."""

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            # Official pickles lack <mask>; append it rather than renumbering their words.
            if tuple(words[:4]) != SPECIALS[:4]:
                raise ValueError(f"vocabulary must start with {SPECIALS[:4]}, got {words[:4]}")
            if "<mask>" not in words:
                words.append("<mask>")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}

    pad, start, end, unk = 0, 1, 2, 3

    @property
    def mask(self) -> int:
        return self.stoi["<mask>"]

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str) -> list[int]:
        """Token ids of a caption wrapped in <start> ... <end>."""
        ids = [self.stoi.get(w, self.unk) for w in tokenize(caption)]
        return [self.start, *ids, self.end]

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocab:
        """Vocabulary of the words seen at least `min_count` times, most frequent first."""
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted(
            (w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls([*SPECIALS, *(w for w in words if w not in SPECIALS)])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": self.itos}))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a setdiv `.json` vocabulary or an official `.pkl` (restricted unpickling)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        if path.suffix == ".pkl":
            return cls._from_official_pickle(path.read_bytes(), str(path))
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: expected a JSON object with a 'words' list")
        return cls(data["words"])

    @classmethod
    def _from_official_pickle(cls, blob: bytes, source: str) -> Vocab:
        try:
            # latin1: Python 2 pickles store str as bytes; _py2_text recovers their UTF-8.
            obj = _VocabUnpickler(io.BytesIO(blob), encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError) as exc:
            raise ValueError(f"{source}: not a vocabulary pickle: {exc}") from None
        state = obj.__dict__ if isinstance(obj, _OfficialVocabulary) else obj
        idx2word = state.get("idx2word") if isinstance(state, dict) else None
        if not isinstance(idx2word, dict):
            raise ValueError(f"{source}: vocabulary pickle has no idx2word mapping")
        ordered = sorted(((int(i), w) for i, w in idx2word.items()), key=lambda t: t[0])
        if [i for i, _ in ordered] != list(range(len(ordered))):
            raise ValueError(f"{source}: idx2word ids are not 0..n-1")
        return cls([_py2_text(w) for _, w in ordered])


def _py2_text(word: object) -> str:
    if isinstance(word, bytes):
        return word.decode("utf-8", errors="replace")
    try:
        return str(word).encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return str(word)


class _OfficialVocabulary:
    """Stand-in for the official `Vocabulary` class: only receives its state dict."""


class _VocabUnpickler(pickle.Unpickler):
    """Accepts the official `Vocabulary` class and nothing else that could execute code."""

    def find_class(self, module: str, name: str) -> type:
        if name == "Vocabulary" and module in ("__main__", "vocab", "lib.vocab"):
            return _OfficialVocabulary
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a vocabulary pickle")


def load_glove(path: str | Path, vocab: Vocab, dim: int) -> tuple[Tensor, int]:
    """Word vectors for `vocab` from a GloVe text file -> ((len(vocab), dim), words found).

    Words absent from the file keep a small random init (N(0, 0.1)); the special tokens too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file not found: {path}")
    weights = torch.randn(len(vocab), dim) * 0.1
    found = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            word, *values = line.rstrip("\n").split(" ")
            idx = vocab.stoi.get(word)
            if idx is None or idx < len(SPECIALS):
                continue
            if len(values) != dim:
                raise ValueError(
                    f"{path}:{lineno}: '{word}' has {len(values)} values, expected {dim}"
                )
            weights[idx] = torch.tensor([float(v) for v in values])
            found += 1
    return weights, found
