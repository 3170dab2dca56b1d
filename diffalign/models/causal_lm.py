"""Causal LMs: preference examples in, summed / averaged completion log-probs out (TRL's conventions).

Tokenisation follows TRL 1.16's ``DPOTrainer`` (``trl/trainer/dpo_trainer.py``): standard (string) data gets the EOS
token appended to each completion; conversational data (lists of ``{"role", "content"}`` messages) goes through the
tokenizer's chat template, the prompt with ``add_generation_prompt=True``. The prompt and each prompt+completion are
tokenised separately and the completion starts where the two token sequences diverge (a token merged across the
boundary moves to the completion). Sequences are truncated to ``max_length`` keeping the start.

A batch holds ``2B`` right-padded rows, chosen first then rejected, with a ``completion_mask`` over the completion
tokens. The log-likelihood of a completion is

    a = Σ_t log softmax(logits_{t−1})[x_t]     over completion positions t (prompt and padding masked),

optionally divided by the number of completion tokens (SimPO / ORPO / IPO-style averages). The per-token values
are returned too, for LD-DPO, WPO and the GRPO losses. Computed in float32 whatever the model dtype.

The functions evaluate whichever model they are given. Which network is the reference is the trainer's decision
(:mod:`diffalign.trainers.reference`); the trainer runs :func:`completion_token_stats` on the network it picked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def is_conversational(value: Any) -> bool:
    """Whether ``value`` is a list of chat messages (dicts with ``role`` and ``content``)."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, Mapping) and "role" in m for m in value)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer: Any, text_or_messages: Any, **chat_kwargs: Any) -> list[int]:
    if is_conversational(text_or_messages):
        out = tokenizer.apply_chat_template(text_or_messages, tokenize=True, **chat_kwargs)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    return list(tokenizer(text_or_messages, add_special_tokens=True)["input_ids"])


def prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids generation starts from: a string with the tokenizer's special tokens, or chat messages through the
    chat template with ``add_generation_prompt=True``."""
    if is_conversational(prompt):
        return _ids(tokenizer, prompt, add_generation_prompt=True)
    return _ids(tokenizer, prompt)


@torch.no_grad()
def sample_completion_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: int,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[list[int]]:
    """One sampled completion per prompt (token ids), ``generate`` on the left-padded batch in eval mode under
    ``torch.manual_seed(seed)`` in a forked RNG (the caller's random state is untouched). Each completion ends after
    its first EOS (kept) or after ``max_new_tokens``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left-padded: every completion starts at column `width`
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
            )
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return completions


def tokenize_completions(tokenizer: Any, prompt: Any, completions: Sequence[Any]) -> dict[str, Any]:
    """``{"prompt_ids", "completion_ids": [ids per completion]}`` of one prompt and its completions (see the module
    docstring); the prompt is cut where the first completion's tokens diverge from it."""
    conversational = is_conversational(prompt)
    if any(is_conversational(c) != conversational for c in completions):
        raise ValueError("the prompt and its completions must all be strings or all be lists of chat messages")
    if conversational:
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_ids(tokenizer, list(prompt) + list(completion)) for completion in completions]
    else:
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token; set one (TRL appends it to standard completions)")
        prompt_ids = _ids(tokenizer, prompt)
        full = [_ids(tokenizer, prompt + (c if c.endswith(eos) else c + eos)) for c in completions]
    start = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return {"prompt_ids": prompt_ids[:start], "completion_ids": [ids[start:] for ids in full]}


def tokenize_preference(tokenizer: Any, prompt: Any, chosen: Any, rejected: Any) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one example (see the module docstring)."""
    out = tokenize_completions(tokenizer, prompt, [chosen, rejected])
    return {
        "prompt_ids": out["prompt_ids"],
        "chosen_ids": out["completion_ids"][0],
        "rejected_ids": out["completion_ids"][1],
    }


def collate_completions(
    examples: Sequence[Mapping[str, Any]], *, pad_token_id: int, max_length: int | None = None
) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``completion_mask`` of shape (n·B, T) for B examples with n completions
    each (``{"prompt_ids", "completion_ids"}``): rows ``j·B .. (j+1)·B − 1`` hold every example's completion ``j``
    (pairs: chosen first, then rejected, as TRL), right-padded, each truncated to ``max_length`` keeping the start."""
    if not examples:
        raise ValueError("collate_completions: got no examples")
    n = len(examples[0]["completion_ids"])
    if any(len(ex["completion_ids"]) != n for ex in examples):
        raise ValueError("collate_completions: every example of a batch needs the same number of completions")
    rows, masks = [], []
    for j in range(n):
        for ex in examples:
            completion = list(ex["completion_ids"][j])
            ids = list(ex["prompt_ids"]) + completion
            comp = [0] * len(ex["prompt_ids"]) + [1] * len(completion)
            if max_length is not None:
                ids, comp = ids[:max_length], comp[:max_length]
            rows.append(ids)
            masks.append(comp)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, comp) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        completion_mask[i, : len(comp)] = torch.tensor(comp, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion_mask}


def collate_preference(
    examples: Sequence[Mapping[str, Sequence[int]]], *, pad_token_id: int, max_length: int | None = None
) -> dict[str, Tensor]:
    """:func:`collate_completions` of ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` examples: (2B, T), rows
    0..B−1 prompt+chosen, rows B..2B−1 prompt+rejected."""
    pairs = [
        {"prompt_ids": ex["prompt_ids"], "completion_ids": [ex["chosen_ids"], ex["rejected_ids"]]} for ex in examples
    ]
    return collate_completions(pairs, pad_token_id=pad_token_id, max_length=max_length)


@dataclass
class TokenStats:
    """One forward's per-token results over (N, T−1) next-token positions, float32."""

    logps: Tensor  # log p(x_t), zero outside the completion
    mask: Tensor  # bool, completion tokens
    # (N,) mean over completion tokens of the vocabulary-mean logit (TRL logits/chosen|rejected); with_details only
    mean_logits: Tensor | None
    top1_correct: Tensor | None  # bool, argmax == target (TRL mean_token_accuracy); with_details only
    log_sum_sq_probs: Tensor | None = None  # log Σ_v p_v² per position (WPO weights), when asked for


def completion_token_stats(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    with_sum_sq: bool = False,
    temperature: float = 1.0,
    with_details: bool = True,
) -> TokenStats:
    """Per-token log-probs of each next token and (``with_details``) the statistics TRL logs, from one forward;
    ``temperature`` divides the logits first (GRPO scores completions under the distribution they were sampled from,
    as TRL). Reference forwards need only the log-probs."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:]
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = (completion_mask[:, 1:] * attention_mask[:, 1:]).bool()
    mean_logits = top1 = None
    with torch.no_grad():
        if with_details:
            mean_logits = (logits.mean(-1) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            top1 = (logits.argmax(-1) == targets) & mask
        sum_sq = torch.logsumexp(2 * log_probs, dim=-1) if with_sum_sq else None
    return TokenStats(token_logps.masked_fill(~mask, 0.0), mask, mean_logits, top1, sum_sq)


def sequence_logps(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """Σ over completion tokens (``average``: divided by their number); (N,)."""
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def load_causal_lm(
    pretrained: str,
    *,
    revision: str | None = None,
    torch_dtype: str = "float32",
    trust_remote_code: bool = False,
    local_files_only: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a transformers folder or hub id; a missing pad token becomes the EOS token (TRL)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": local_files_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, **options)
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, torch_dtype), **options)
    except OSError as err:
        from diffalign.models.loading import ModelNotFoundError

        raise ModelNotFoundError(
            f"model.pretrained '{pretrained}': could not load a causal LM and its tokenizer ({err}). Give a folder "
            "written by save_pretrained (config.json, weights, tokenizer files) or a hub id"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (TRL's ``disable_dropout=True``: policy and reference then agree)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
