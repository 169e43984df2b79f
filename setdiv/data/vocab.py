"""Word vocabulary for the bi-GRU text encoder, GloVe vectors, and caption tokenisation.

Vocabularies are exchanged as JSON (`Vocab.save` / `Vocab.load`), recording the tokenizer that
built them. The official DivE / VSE vocabulary pickles are read through a restricted unpickler
that only accepts their `Vocabulary` class and plain containers, so loading one never executes
code; they were built with NLTK's `word_tokenize` on lower-cased captions.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from setdiv.data import noise
from setdiv.data.shards import ShardSet
from setdiv.errors import UserError

__all__ = [
    "SPECIALS",
    "TOKENIZERS",
    "Vocab",
    "build_from_shards",
    "glove_fallback",
    "load_glove",
    "shard_captions",
    "tokenize",
]

log = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>", "<mask>")
"""Fixed ids 0..4 in vocabularies built here; official pickles hold the first four at 0..3."""

TOKENIZERS = ("nltk", "regex")
"""Caption tokenisers: `nltk` as the official vocabularies were built, `regex` a simple one."""

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


@functools.cache
def _nltk() -> tuple[Any, Any]:
    """(sentence splitter, word tokenizer). Imported on first use: importing nltk takes ~1.3 s
    (it loads scipy.stats), which processes that never tokenise with it should not pay.

    `nltk.word_tokenize` splits sentences with the trained English Punkt model (a data
    download) before the Treebank-style word tokenizer, so a period ending an inner sentence is
    its own token ("dogs. and" -> dogs . and). Punkt without training data splits the same way
    except after known abbreviations; these are the ones the official vocabularies keep whole.
    """
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    abbreviations = PunktParameters()
    abbreviations.abbrev_types = {"mr", "mrs", "dr", "st", "ave", "u.s", "d.c", "j.p"}
    return PunktSentenceTokenizer(abbreviations), NLTKWordTokenizer()


def tokenize(caption: str, kind: str = "nltk") -> list[str]:
    """Word tokens of a lower-cased caption.

    `nltk`: NLTK's Treebank-style tokenizer per sentence, as `nltk.word_tokenize` (which built
    the official vocabularies): "isn't" -> is n't, "man's" -> man 's, "t-shirt" stays whole.
    `regex`: runs of letters/digits (with a trailing 's-style clitic) and single punctuation.
    """
    return list(_tokenize(caption, kind))


@functools.lru_cache(maxsize=1 << 16)
def _tokenize(caption: str, kind: str) -> tuple[str, ...]:
    # Cached: NLTK costs ~0.2 ms a caption, and short-caption datasets repeat captions a lot.
    text = caption.lower()
    if kind == "nltk":
        sentences, words = _nltk()
        return tuple(w for s in sentences.tokenize(text) for w in words.tokenize(s))
    if kind == "regex":
        return tuple(_TOKEN.findall(text))
    raise ValueError(f"unknown tokenizer {kind!r}, expected one of {TOKENIZERS}")


class Vocab:
    """Word <-> id mapping with `<pad>=0, <start>=1, <end>=2, <unk>=3, <mask>=4`, and the
    tokenizer (`TOKENIZERS`) that splits captions into its words."""

    def __init__(
        self,
        words: Sequence[str],
        tokenizer: str = "nltk",
        counts: dict[str, int] | None = None,
    ) -> None:
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            # Some official pickles lack <mask>; append it rather than renumbering their words.
            if tuple(words[:4]) != SPECIALS[:4]:
                raise UserError(f"vocabulary must start with {SPECIALS[:4]}, got {words[:4]}")
            if "<mask>" not in words:
                words.append("<mask>")
        if len(set(words)) != len(words):
            raise UserError("vocabulary has duplicate words")
        if tokenizer not in TOKENIZERS:
            raise UserError(f"unknown tokenizer {tokenizer!r}, expected one of {TOKENIZERS}")
        self.itos = words
        self.stoi = {w: i for i, w in enumerate(words)}
        self.tokenizer = tokenizer
        self.counts = counts  # word -> count in the captions it was built from (None: unknown)

    pad, start, end, unk = 0, 1, 2, 3

    @property
    def mask(self) -> int:
        return self.stoi["<mask>"]

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str) -> list[int]:
        """Token ids of a caption wrapped in <start> ... <end>."""
        ids = [self.stoi.get(w, self.unk) for w in tokenize(caption, self.tokenizer)]
        return [self.start, *ids, self.end]

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, tokenizer: str = "nltk") -> Vocab:
        """Vocabulary of the words seen at least `min_count` times, most frequent first (ties
        alphabetical), after the special tokens."""
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r}, expected one of {TOKENIZERS}")
        counts = Counter(w for c in captions for w in tokenize(c, tokenizer))
        words = sorted(
            (w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
            key=lambda w: (-counts[w], w),
        )
        return cls([*SPECIALS, *words], tokenizer, {w: counts[w] for w in words})

    def save(self, path: str | Path) -> None:
        data: dict = {"tokenizer": self.tokenizer, "words": self.itos}
        if self.counts is not None:
            data["counts"] = self.counts
        Path(path).write_text(json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a setdiv `.json` vocabulary or an official `.pkl` (restricted unpickling).

        Official pickles were built with NLTK (`tokenizer="nltk"`); a setdiv JSON without a
        `tokenizer` entry predates NLTK support here and was built with `regex`.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        if path.suffix == ".pkl":
            return cls._from_official_pickle(path.read_bytes(), str(path))
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a JSON vocabulary: {exc}") from None
        except RecursionError:
            raise UserError(f"{path}: not a vocabulary (JSON nested too deeply)") from None
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise UserError(f"{path}: expected a JSON object with a 'words' list")
        if not all(isinstance(w, str) for w in data["words"]):
            raise UserError(f"{path}: 'words' must be a list of strings")
        return cls(data["words"], data.get("tokenizer", "regex"), data.get("counts"))

    @classmethod
    def _from_official_pickle(cls, blob: bytes, source: str) -> Vocab:
        try:
            # latin1: Python 2 pickles store str as bytes; _py2_text recovers their UTF-8.
            obj = _VocabUnpickler(io.BytesIO(blob), encoding="latin1").load()
        except Exception as exc:  # noqa: BLE001 -- bad opcodes, bad arguments to the class, ...
            raise UserError(
                f"{source}: not a vocabulary pickle ({type(exc).__name__}: {exc})"
            ) from None
        state = obj.__dict__ if isinstance(obj, _OfficialVocabulary) else obj
        idx2word = state.get("idx2word") if isinstance(state, dict) else None
        if not isinstance(idx2word, dict):
            raise UserError(f"{source}: vocabulary pickle has no idx2word mapping")
        try:
            ordered = sorted(((int(i), w) for i, w in idx2word.items()), key=lambda t: t[0])
        except (TypeError, ValueError):
            raise UserError(f"{source}: idx2word keys are not integer ids") from None
        if [i for i, _ in ordered] != list(range(len(ordered))):
            raise UserError(f"{source}: idx2word ids are not 0..n-1")
        return cls([_py2_text(w) for _, w in ordered], tokenizer="nltk")


def shard_captions(pattern: str, caption_key: str | None = None) -> Iterator[str]:
    """Every caption of the shards matching `pattern` (braces and globs expanded; setdiv
    shards checked against their index, img2dataset shards read in place, the format found
    as the readers find it); samples without readable captions are skipped."""
    shards = ShardSet.resolve(pattern, None, "auto", caption_key)
    for path in shards.paths:
        for _, captions in noise.shard_captions(str(path), shards.format, caption_key):
            yield from captions


def build_from_shards(
    pattern: str, min_count: int = 1, tokenizer: str = "nltk", caption_key: str | None = None
) -> Vocab:
    """`Vocab.build` over the captions of the training shards matching `pattern`."""
    return Vocab.build(shard_captions(pattern, caption_key), min_count, tokenizer)


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


def glove_fallback(word: str) -> str:
    """The GloVe entry tried for a word GloVe lacks, as the official word-vector init does:
    drop every `-`, `.` and `'`, then keep what precedes the first `/` ("t-shirt" -> tshirt,
    "n't" -> nt, "red/white" -> red)."""
    word = word.replace("-", "").replace(".", "").replace("'", "")
    return word.split("/")[0]


def load_glove(path: str | Path, vocab: Vocab, dim: int) -> tuple[Tensor, int]:
    """Word vectors for `vocab` from a GloVe text file -> ((len(vocab), dim), rows found).

    A word takes its own GloVe vector, else that of `glove_fallback(word)`. Rows left without
    one (and the special tokens) keep N(0, 1) init, `nn.Embedding`'s, as in the official code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file not found: {path}")
    rows = [(i, w) for i, w in enumerate(vocab.itos) if w not in SPECIALS]
    wanted = {w for _, w in rows} | {glove_fallback(w) for _, w in rows}
    vectors = dict(_read_glove(path, wanted - {""}, dim))
    weights = torch.randn(len(vocab), dim)
    found = 0
    for idx, word in rows:
        vec = vectors.get(word)
        if vec is None:
            vec = vectors.get(glove_fallback(word))
        if vec is not None:
            weights[idx] = vec
            found += 1
    log.info("GloVe: %d of %d vocabulary words initialised from %s", found, len(rows), path)
    return weights, found


def _read_glove(path: Path, wanted: set[str], dim: int) -> Iterator[tuple[str, Tensor]]:
    """(word, (dim,) vector) for the lines of `wanted` words; a later duplicate line wins."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            # A few lines of the 840B file hold words with spaces: the vector is the last `dim`.
            if len(parts) < dim + 1 or (lineno == 1 and len(parts) != dim + 1):
                raise UserError(
                    f"{path}:{lineno}: '{parts[0]}' has {len(parts) - 1} values, expected {dim}"
                )
            word = " ".join(parts[:-dim])
            if word in wanted:
                yield word, torch.tensor([float(v) for v in parts[-dim:]])
