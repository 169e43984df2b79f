"""Caption tokenisation for both text encoders, and word dropout (docs/method.md §5).

`Tokenizer` is what the readers use: `encode(caption) -> ids` wrapped in start/end (or
[CLS]/[SEP]) ids, plus what word dropout needs: the special ids, and for BERT which word
pieces continue the previous word (`##...`), since dropout decides per whole word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from setdiv.config import TextEncoderConfig
from setdiv.data.vocab import SPECIALS, Vocab
from setdiv.errors import UserError

__all__ = ["Tokenizer", "build_tokenizer", "word_dropout"]


BERT_MAX_TOKENS = 512
"""Longest token sequence a BERT tokenizer gives (BERT's position table)."""

CHARS_PER_TOKEN = 32
"""A caption is cut to this many characters per token the tower can read before it is
tokenised: a token of English text spans about 4, so the cut never reaches the tokens kept,
and a 10 MB alt-text costs microseconds instead of seconds and a gigabyte."""


@dataclass
class Tokenizer:
    vocab: Vocab | None
    """bi-GRU vocabulary, or None for a BERT tokenizer."""
    bert: object | None
    """A transformers tokenizer (`AutoTokenizer`) read from a local directory."""
    pad_id: int
    mask_id: int
    first_word_id: int
    """Random-word replacement draws ids from [first_word_id, vocab_size)."""
    vocab_size: int
    continues_word: np.ndarray | None = None
    """(ids,) bool: the id is a word piece continuing the previous word (BERT `##...`);
    None: every id is a word of its own (bi-GRU)."""
    clip: object | None = None
    """An open_clip tokenizer (BPE, bundled with open_clip): ids up to its end-of-text."""

    def encode(self, caption: str) -> list[int]:
        if self.vocab is not None:
            return self.vocab.encode(caption)
        if self.clip is not None:  # padded to its context length, truncated with end-of-text
            context = int(getattr(self.clip, "context_length", 77))
            ids = self.clip([caption[: CHARS_PER_TOKEN * context]])[0].tolist()  # type: ignore[operator]
            return ids[: ids.index(self.clip.eot_token_id) + 1]  # type: ignore[attr-defined]
        # Truncated to what the encoder's positions cover: web alt-text can be very long.
        limit = min(getattr(self.bert, "model_max_length", BERT_MAX_TOKENS), BERT_MAX_TOKENS)
        caption = caption[: CHARS_PER_TOKEN * limit]
        ids = self.bert(caption, add_special_tokens=True, truncation=True, max_length=limit)  # type: ignore[misc]
        return list(ids["input_ids"])


def _continuations(pieces: list[str]) -> np.ndarray:
    """(ids,) bool: the piece continues the previous word. WordPiece marks continuations
    (`##ing`); SentencePiece (`▁the`) and byte-level BPE (`Ġthe`) mark word starts instead."""
    if any(p.startswith("##") for p in pieces):
        return np.array([p.startswith("##") for p in pieces], dtype=bool)
    counts = {m: sum(p.startswith(m) for p in pieces) for m in ("\u2581", "\u0120")}  # ▁, Ġ
    start = max(counts, key=counts.__getitem__)
    if counts[start] == 0:  # unknown scheme: every piece a word of its own
        return np.zeros(len(pieces), dtype=bool)
    return np.array([not p.startswith(start) for p in pieces], dtype=bool)


def config_vocab(cfg: TextEncoderConfig, purpose: str) -> Vocab:
    """The bi-GRU vocabulary `model.text.vocab_path` names, read (`Vocab.load`) and checked
    against `model.text.tokenizer`: the one place a config's vocabulary is loaded. `purpose`
    names what needs it in the error when the key is not set."""
    if cfg.vocab_path is None:
        raise UserError(f"{purpose} needs 'model.text.vocab_path' (see `setdiv vocab`)")
    if not Path(cfg.vocab_path).is_file():
        raise FileNotFoundError(f"config key 'model.text.vocab_path': not found: {cfg.vocab_path}")
    vocab = Vocab.load(cfg.vocab_path)
    _check_tokenizer(vocab, cfg, cfg.vocab_path)
    return vocab


def _check_tokenizer(vocab: Vocab, cfg: TextEncoderConfig, source: str) -> None:
    if vocab.tokenizer != cfg.tokenizer:
        raise UserError(
            f"{source} was built with the {vocab.tokenizer!r} tokenizer but "
            f"'model.text.tokenizer' is {cfg.tokenizer!r}: set model.text.tokenizer="
            f"{vocab.tokenizer} or rebuild the vocabulary (`setdiv vocab --tokenizer "
            f"{cfg.tokenizer}`)"
        )


def build_tokenizer(cfg: TextEncoderConfig, vocab: Vocab | None = None) -> Tokenizer:
    """The tokenizer matching the text encoder config: a `Vocab` (given, or read from
    `model.text.vocab_path`) for bigru; the Hugging Face tokenizer in `model.text.bert_path` for
    bert (any encoder: WordPiece, SentencePiece or byte-level BPE pieces); open_clip's own.

    A bigru vocabulary records the tokenizer that built it (official pickles: nltk); one that
    differs from `model.text.tokenizer` raises `ValueError` rather than silently splitting
    captions into words the vocabulary was not built from."""
    if cfg.name == "open_clip":
        import open_clip

        if cfg.arch is None or open_clip.get_model_config(cfg.arch) is None:
            raise UserError(f"config key 'model.text.arch': {cfg.arch!r} is not an open_clip model")
        tok = open_clip.get_tokenizer(cfg.arch)
        size = int(getattr(tok, "vocab_size", 0) or len(tok.encoder))
        # No mask token in CLIP's vocabulary: word dropout is refused for it (the trainer).
        return Tokenizer(None, None, 0, -1, 1, size, None, tok)
    if cfg.name == "bert":
        from transformers import AutoTokenizer

        if cfg.bert_path is None or not Path(cfg.bert_path).is_dir():
            raise FileNotFoundError(
                f"config key 'model.text.bert_path': not found: {cfg.bert_path}"
            )
        tok = AutoTokenizer.from_pretrained(cfg.bert_path, local_files_only=True)
        first_word = max(tok.all_special_ids) + 1
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        mask_id = -1 if tok.mask_token_id is None else tok.mask_token_id
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        return Tokenizer(
            None, tok, pad_id, mask_id, first_word, tok.vocab_size, _continuations(pieces)
        )
    vocab = vocab or config_vocab(cfg, "bigru tokenisation")
    _check_tokenizer(vocab, cfg, cfg.vocab_path or "the given vocabulary")
    return Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))


def word_dropout(ids: list[int], tok: Tokenizer, p: float, rng: np.random.Generator) -> list[int]:
    """VSE-infinity word dropout, one decision per word: each inner word is chosen with
    probability p; of those 50% have every piece replaced by the mask token, 10% every piece by
    a random word (drawn per piece) and 40% are deleted. First/last ids are kept.

    A BERT word is its first piece and the `##` pieces that follow (`tok.continues_word`), as
    the official code drops BERT caption words before splitting them into pieces."""
    if p <= 0 or len(ids) <= 2:
        return ids
    out = [ids[0]]
    for word in _words(ids[1:-1], tok.continues_word):
        if rng.random() >= p:
            out += word
            continue
        r = rng.random()
        if r < 0.5:
            out += [tok.mask_id] * len(word)
        elif r < 0.6:
            out += [int(i) for i in rng.integers(tok.first_word_id, tok.vocab_size, len(word))]
        # else: deleted
    out.append(ids[-1])
    return out


def _words(ids: list[int], continues_word: np.ndarray | None) -> list[list[int]]:
    """`ids` grouped into words: a continuing piece joins the word before it."""
    if continues_word is None:
        return [[t] for t in ids]
    words: list[list[int]] = []
    for t in ids:
        if words and t < len(continues_word) and continues_word[t]:
            words[-1].append(t)
        else:
            words.append([t])
    return words
