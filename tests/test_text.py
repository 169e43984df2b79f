"""Tokenizers of both text encoders and word dropout: BERT words drop as a whole, as in the
official `process_caption_bert`, and a vocabulary's tokenizer must match the config."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from setdiv import config as config_lib
from setdiv.config import TextEncoderConfig
from setdiv.data.text import Tokenizer, build_tokenizer, word_dropout
from setdiv.data.vocab import SPECIALS, Vocab

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "sur", "##f", "##board"]
BERT_WORDS += ["##s", *(f"w{i}" for i in range(30))]


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("bert")
    (root / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root / "bert")
    return build_tokenizer(TextEncoderConfig(name="bert", bert_path=str(root / "bert")))


def test_bert_pieces_know_their_word(bert_tok: Tokenizer) -> None:
    ids = bert_tok.encode("A red surfboards")
    pieces = ["[CLS]", "a", "red", "sur", "##f", "##board", "##s", "[SEP]"]
    assert ids == [BERT_WORDS.index(t) for t in pieces]
    assert bert_tok.continues_word is not None
    assert [bool(bert_tok.continues_word[i]) for i in ids] == [0, 0, 0, 0, 1, 1, 1, 0]


def test_bert_word_dropout_treats_a_word_as_a_whole(bert_tok: Tokenizer) -> None:
    ids = bert_tok.encode("surfboards")  # [CLS] sur ##f ##board ##s [SEP]
    word = ids[1:-1]
    outcomes: Counter[str] = Counter()
    random_words = []
    for seed in range(3000):
        out = word_dropout(ids, bert_tok, 1.0, np.random.default_rng(seed))
        assert out[0] == ids[0] and out[-1] == ids[-1]
        inner = out[1:-1]
        if not inner:
            outcomes["deleted"] += 1
        elif inner == [bert_tok.mask_id] * len(word):
            outcomes["masked"] += 1
        else:
            # Neither kept (p = 1) nor partly masked: every piece replaced by a random word.
            assert len(inner) == len(word) and bert_tok.mask_id not in inner, inner
            assert all(bert_tok.first_word_id <= i < bert_tok.vocab_size for i in inner)
            random_words.append(inner)
    assert abs(outcomes["masked"] / 3000 - 0.5) < 0.03
    assert abs(outcomes["deleted"] / 3000 - 0.4) < 0.03
    assert abs(len(random_words) / 3000 - 0.1) < 0.02
    # The official code draws a random token per piece.
    assert any(len(set(r)) > 1 for r in random_words)


def test_bert_word_dropout_keeps_or_drops_all_pieces(bert_tok: Tokenizer) -> None:
    ids = bert_tok.encode("a surfboards red")  # [CLS] a sur ##f ##board ##s red [SEP]
    lengths = Counter(
        len(word_dropout(ids, bert_tok, 0.5, np.random.default_rng(s))) - 2 for s in range(2000)
    )
    # "a" and "red" give 0 or 1 ids each, the 4-piece word 0 or 4: never 3 ids in all.
    assert set(lengths) == {0, 1, 2, 4, 5, 6}
    # The word survives (kept, masked or random) with 1 - 0.5 * 0.4.
    survives = sum(n for k, n in lengths.items() if k >= 4) / 2000
    assert abs(survives - 0.8) < 0.03


def test_bigru_word_dropout_decides_per_token() -> None:
    vocab = Vocab([*SPECIALS, "a", "red", "dog"])
    tok = build_tokenizer(TextEncoderConfig(), vocab)
    assert tok.continues_word is None
    ids = tok.encode("a red dog")
    lengths = Counter(
        len(word_dropout(ids, tok, 1.0, np.random.default_rng(s))) for s in range(2000)
    )
    assert set(lengths) == {2, 3, 4, 5}  # the three words are deleted independently


def test_vocabulary_tokenizer_must_match_config(tmp_path: Path) -> None:
    vocab = Vocab.build(["a man's hat"], tokenizer="regex")
    vocab.save(tmp_path / "v.json")
    cfg = TextEncoderConfig(vocab_path=str(tmp_path / "v.json"))
    with pytest.raises(ValueError, match="built with the 'regex' tokenizer.*model.text.tokenizer"):
        build_tokenizer(cfg)
    tok = build_tokenizer(TextEncoderConfig(vocab_path=str(tmp_path / "v.json"), tokenizer="regex"))
    assert tok.encode("A man's hat") == [1, *(vocab.stoi[w] for w in ("a", "man's", "hat")), 2]
    with pytest.raises(ValueError, match="'nltk' tokenizer"):
        build_tokenizer(TextEncoderConfig(tokenizer="regex"), Vocab.build(["a"]))


def test_config_tokenizer_choices() -> None:
    assert config_lib.load().model.text.tokenizer == "nltk"
    assert config_lib.load([], ["model.text.tokenizer=regex"]).model.text.tokenizer == "regex"
    with pytest.raises(config_lib.ConfigError, match="model.text.tokenizer"):
        config_lib.load([], ["model.text.tokenizer=spacy"])


@pytest.mark.parametrize("scheme", ["byte_bpe", "sentencepiece"])
def test_word_boundaries_of_bpe_and_sentencepiece_tokenizers(tmp_path: Path, scheme: str) -> None:
    """A Hugging Face directory with a byte-level BPE (RoBERTa-style `Ġword`) or a
    SentencePiece-style (`▁word`) vocabulary: `continues_word` marks exactly the pieces the fast
    tokenizer's own `word_ids()` puts in the same word as the piece before them."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [
        "a",
        "red",
        "surfboard",
        "on",
        "the",
        "beach",
        "two",
        "dogs",
        "surfing",
        "waves",
        "near",
        "boards",
    ]
    corpus = [" ".join(words[i : i + 4]) for i in range(len(words))] * 3
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    if scheme == "byte_bpe":
        raw = RawTokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raw = RawTokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Metaspace()
        raw.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=specials)
    raw.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    fast.save_pretrained(tmp_path / "hf")
    tok = build_tokenizer(TextEncoderConfig(name="bert", bert_path=str(tmp_path / "hf")))
    assert tok.mask_id == fast.mask_token_id and tok.pad_id == fast.pad_token_id
    caption = "two red surfboards near the waves"
    enc = fast(caption)
    ids, word_ids = enc["input_ids"], enc.word_ids()
    assert tok.encode(caption) == ids
    assert tok.continues_word is not None
    expected = [i > 0 and w is not None and w == word_ids[i - 1] for i, w in enumerate(word_ids)]
    assert any(expected), "the caption should split at least one word into pieces"
    assert [bool(tok.continues_word[i]) for i in ids] == expected


def test_a_huge_caption_is_cut_before_it_is_tokenised(bert_tok: Tokenizer) -> None:
    """A 10 MB alt-text was tokenised whole before truncation (14 s, 1.4 GB). The caption is
    now cut to a bound from the tower's maximum length first: fast, and the ids are those of
    tokenising a prefix far longer than the cut (the tokens kept lie well inside it)."""
    import time

    huge = "a red surfboards w1 w2, " * 450_000  # ~10.8 MB
    t0 = time.perf_counter()
    ids = bert_tok.encode(huge)
    took = time.perf_counter() - t0
    reference = bert_tok.bert(huge[:200_000], truncation=True, max_length=512)["input_ids"]  # type: ignore[operator]
    assert ids == list(reference) and len(ids) == 512
    assert took < 1.0, took  # (whole: several seconds)


def test_a_huge_caption_is_cut_for_the_clip_tokenizer() -> None:
    open_clip = pytest.importorskip("open_clip")
    tok = Tokenizer(None, None, 0, 0, 1, 49408, clip=open_clip.get_tokenizer("ViT-B-16"))
    huge = "a photo of a red surfboard on the beach. " * 250_000  # ~10 MB
    ids = tok.encode(huge)
    reference = tok.clip([huge[:50_000]])[0].tolist()  # type: ignore[operator]
    assert ids == reference[: reference.index(49407) + 1] and len(ids) == 77
