"""The tiny Llama the causal-LM tests build (2 layers, width 32, 4 heads, tied embeddings, 64 positions)."""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


def tiny_llama_config(vocab_size: int, **kwargs: Any) -> LlamaConfig:
    """A :class:`LlamaConfig` of the tiny test size over ``vocab_size`` tokens; ``kwargs`` add fields (e.g. the
    tokenizer's ``pad_token_id``)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        **kwargs,
    )
