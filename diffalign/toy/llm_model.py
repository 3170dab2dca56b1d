"""The toy LM: a word-level tokenizer over the toy language and a tiny Llama, plus sampling and the gold metrics.

* Tokenizer: ``tokenizers`` ``WordLevel`` over :data:`diffalign.toy.llm_world.VOCABULARY` (built from the word
  list, no training; 41 ids), after the special tokens ``<pad> <s> </s> <unk> <|system|> <|user|> <|assistant|>``.
  The pre-tokenizer keeps runs of word characters and isolates every other non-space character (the world's
  :func:`~diffalign.toy.llm_world.words`), so ``tokenizer(prompt + completion)`` starts with ``tokenizer(prompt)``
  whether or not the completion starts with a space (prompts end in ``>``). ``<s>`` is prepended by the
  post-processor, as Llama does; nothing is appended. Decoding joins words with single spaces (no clean-up).
* Chat template: ``<s><|user|> {content} <|assistant|> {content} </s>`` (every turn tagged with ``<|role|>``, an
  assistant turn closed by ``</s>``); ``add_generation_prompt`` appends ``<|assistant|>``. The base is pretrained on
  a share of sequences in this form, so conversational data works with it too.
* Model: ``LlamaForCausalLM`` with hidden 64, 2 layers, 4 heads, MLP 128, 64 positions, tied embeddings (84,864
  parameters, 0.35 MB in float32).

Sampling (:func:`generate_completions`) is plain ancestral sampling from the model's distribution (``top_k=0``,
``top_p=1``), left-padded batches, each batch under ``torch.manual_seed`` of a key derived from ``(seed, batch)``
inside a forked RNG (the caller's global RNG state is left untouched).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from diffalign.models.causal_lm import prompt_ids, sample_completion_ids
from diffalign.toy.llm_world import (
    VOCABULARY,
    all_prompts,
    gold_score,
    has_property,
    parse_completion,
    parse_prompt,
    words,
)
from diffalign.utils.randomness import sample_key

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
MAX_LENGTH = 64
MAX_NEW_TOKENS = 20

_GENERATION_STREAM = 210


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """The toy word-level tokenizer (deterministic: ids are the order of :data:`SPECIAL_TOKENS` then the
    vocabulary)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *VOCABULARY])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


#: The toy architecture (``LlamaConfig`` keyword arguments besides the vocabulary and special ids).
ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": MAX_LENGTH,
    "tie_word_embeddings": True,
}


def llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """:data:`ARCHITECTURE` with the tokenizer's vocabulary size and special ids."""
    return LlamaConfig(
        **ARCHITECTURE,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised toy Llama (parameters seeded by ``seed``; the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_toy_lm(path: str | os.PathLike) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` saved in ``path`` by ``save_pretrained`` (local files only; the model in eval mode)."""
    model = LlamaForCausalLM.from_pretrained(Path(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    return model.eval(), tokenizer


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[Any],
    *,
    n_per_prompt: int = 1,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 256,
) -> list[str]:
    """``n_per_prompt`` sampled completions of each prompt (a string, or chat messages rendered with
    ``add_generation_prompt=True``), prompt-major: ``out[i * n_per_prompt + j]`` is sample ``j`` of prompt ``i``.
    Each is the decoded text after the prompt up to the first ``</s>`` (special tokens skipped). Deterministic for a
    given ``seed``, prompt list and ``batch_size``."""
    if n_per_prompt < 1 or batch_size < 1 or temperature <= 0:
        raise ValueError(f"n_per_prompt={n_per_prompt}, batch_size={batch_size}, temperature={temperature}")
    encoded = [ids for p in prompts for ids in [prompt_ids(tokenizer, p)] * n_per_prompt]
    out: list[str] = []
    for b, start in enumerate(range(0, len(encoded), batch_size)):
        completions = sample_completion_ids(
            model,
            encoded[start : start + batch_size],
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            seed=sample_key(seed, 0, b, _GENERATION_STREAM),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
        out += tokenizer.batch_decode(completions, skip_special_tokens=True)
    return out


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of ``texts`` (0 when there are none)."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def score_samples(prompts: Sequence[Any], completions: Sequence[str], n_per_prompt: int) -> dict[str, Any]:
    """Gold metrics of prompt-major ``completions`` (``n_per_prompt`` per prompt): ``property_rate`` (colour
    right), ``gold_score`` (mean), ``shape_rate``, ``well_formed_rate``, ``diversity`` (distinct completions per
    prompt / n, averaged over prompts) and ``distinct_2``."""
    if len(completions) != len(prompts) * n_per_prompt:
        raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts × {n_per_prompt}")
    owners = [p for p in prompts for _ in range(n_per_prompt)]
    parsed = [parse_completion(c) for c in completions]
    shapes = [parse_prompt(p)[1] for p in owners]
    groups = [completions[i * n_per_prompt : (i + 1) * n_per_prompt] for i in range(len(prompts))]
    n = len(completions)
    return {
        "property_rate": sum(has_property(p, c) for p, c in zip(owners, completions, strict=True)) / n,
        "gold_score": sum(gold_score(p, c) for p, c in zip(owners, completions, strict=True)) / n,
        "shape_rate": sum(q.shape == s for q, s in zip(parsed, shapes, strict=True)) / n,
        "well_formed_rate": sum(q.well_formed for q in parsed) / n,
        "diversity": sum(len(set(g)) / n_per_prompt for g in groups) / len(groups),
        "distinct_2": distinct_n(completions, 2),
    }


def property_rate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[Any] | None = None,
    *,
    n_per_prompt: int = 8,
    seed: int = 0,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Sample ``n_per_prompt`` completions of each prompt (default :func:`~diffalign.toy.llm_world.all_prompts`)
    and return :func:`score_samples`'s metrics plus ``"samples"``: ``[(prompt, completion), ...]``."""
    prompts = list(all_prompts() if prompts is None else prompts)
    completions = generate_completions(
        model, tokenizer, prompts, n_per_prompt=n_per_prompt, seed=seed, temperature=temperature
    )
    metrics = score_samples(prompts, completions, n_per_prompt)
    metrics["samples"] = list(zip([p for p in prompts for _ in range(n_per_prompt)], completions, strict=True))
    return metrics
