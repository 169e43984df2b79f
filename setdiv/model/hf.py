"""Which Hugging Face checkpoints can be a text tower: bidirectional encoders only."""

from __future__ import annotations

from setdiv.errors import UserError

__all__ = ["check_text_encoder"]


def check_text_encoder(hf_cfg: object, path: str) -> None:
    """Refuse a checkpoint that is not an encoder: an encoder-decoder (only its encoder would
    be used) or a decoder-only language model (GPT-2, Llama, ...: causal attention, each
    token sees only those before it, and no first-token summary to pool). Decoder-only: a
    causal-LM architecture with no masked-LM one, as transformers registers them."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(hf_cfg, "model_type", "?")
    if getattr(hf_cfg, "is_encoder_decoder", False):
        what = "an encoder-decoder model"
    elif getattr(hf_cfg, "is_decoder", False) or (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        what = "a decoder-only language model"
    else:
        return
    raise UserError(
        f"config key 'model.text.bert_path': {path} holds {what} ({kind}); the text tower "
        "takes an encoder (BERT, MiniLM, RoBERTa, DistilBERT, ELECTRA, XLM-R, ...)"
    )
