"""Caption tokenisation for both text encoders, and word dropout (SPEC §5).

`Tokenizer` is what the readers use: `encode(caption) -> ids` wrapped in start/end (or
[CLS]/[SEP]) ids, plus the ids word dropout needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from setdiv.config import TextEncoderConfig
from setdiv.data.vocab import SPECIALS, Vocab

__all__ = ["Tokenizer", "build_tokenizer", "word_dropout"]


@dataclass
class Tokenizer:
    vocab: Vocab | None
    """bi-GRU vocabulary, or None for a BERT tokenizer."""
    bert: object | None
    """A transformers BertTokenizer(Fast) read from a local directory."""
    pad_id: int
    mask_id: int
    first_word_id: int
    """Random-word replacement draws ids from [first_word_id, vocab_size)."""
    vocab_size: int

    def encode(self, caption: str) -> list[int]:
        if self.vocab is not None:
            return self.vocab.encode(caption)
        return list(self.bert(caption, add_special_tokens=True)["input_ids"])  # type: ignore[misc]


def build_tokenizer(cfg: TextEncoderConfig, vocab: Vocab | None = None) -> Tokenizer:
    """The tokenizer matching the text encoder config: a `Vocab` (given, or read from
    `model.text.vocab_path`) for bigru; the BERT tokenizer in `model.text.bert_path` for bert."""
    if cfg.name == "bert":
        from transformers import AutoTokenizer

        if cfg.bert_path is None or not Path(cfg.bert_path).is_dir():
            raise FileNotFoundError(
                f"config key 'model.text.bert_path': not found: {cfg.bert_path}"
            )
        tok = AutoTokenizer.from_pretrained(cfg.bert_path, local_files_only=True)
        first_word = max(tok.all_special_ids) + 1
        return Tokenizer(None, tok, tok.pad_token_id, tok.mask_token_id, first_word, tok.vocab_size)
    if vocab is None:
        if cfg.vocab_path is None:
            raise ValueError(
                "bigru tokenisation needs 'model.text.vocab_path' or a built vocabulary"
            )
        if not Path(cfg.vocab_path).is_file():
            raise FileNotFoundError(
                f"config key 'model.text.vocab_path': not found: {cfg.vocab_path}"
            )
        vocab = Vocab.load(cfg.vocab_path)
    return Tokenizer(vocab, None, vocab.pad, vocab.mask, len(SPECIALS), len(vocab))


def word_dropout(ids: list[int], tok: Tokenizer, p: float, rng: np.random.Generator) -> list[int]:
    """VSE-infinity word dropout: each inner token is chosen with probability p; of those 50%
    become the mask token, 10% a random word and 40% are deleted. First/last ids are kept."""
    if p <= 0 or len(ids) <= 2:
        return ids
    out = [ids[0]]
    for t in ids[1:-1]:
        if rng.random() >= p:
            out.append(t)
            continue
        r = rng.random()
        if r < 0.5:
            out.append(tok.mask_id)
        elif r < 0.6:
            out.append(int(rng.integers(tok.first_word_id, tok.vocab_size)))
        # else: deleted
    out.append(ids[-1])
    return out
