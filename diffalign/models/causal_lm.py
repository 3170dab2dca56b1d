"""Causal-LM adapter: preference examples in, summed / averaged completion log-probs out (TRL's conventions).

Tokenisation follows TRL 1.16's ``DPOTrainer`` (research/llm_losses.md §1.2): standard (string) data gets the EOS
token appended to each completion; conversational data (lists of ``{"role", "content"}`` messages) goes through the
tokenizer's chat template, the prompt with ``add_generation_prompt=True``. The prompt and each prompt+completion are
tokenised separately and the completion starts where the two token sequences diverge (a token merged across the
boundary moves to the completion). Sequences are truncated to ``max_length`` keeping the start.

A batch holds ``2B`` right-padded rows, chosen first then rejected, with a ``completion_mask`` over the completion
tokens. The log-likelihood of a completion is

    a = Σ_t log softmax(logits_{t−1})[x_t]     over completion positions t (prompt and padding masked),

optionally divided by the number of completion tokens (SimPO / ORPO / IPO-style averages). The per-token values
are returned too, for LD-DPO, WPO and the GRPO losses. Computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from diffalign.models.reference import adapters_disabled, has_adapters, unwrap


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


def tokenize_preference(tokenizer: Any, prompt: Any, chosen: Any, rejected: Any) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one example (see the module docstring)."""
    conversational = is_conversational(prompt)
    if conversational != is_conversational(chosen) or conversational != is_conversational(rejected):
        raise ValueError("prompt, chosen and rejected must all be strings or all be lists of chat messages")
    if conversational:
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_ids(tokenizer, prompt + completion) for completion in (chosen, rejected)]
    else:
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token; set one (TRL appends it to standard completions)")
        completions = [c if c.endswith(eos) else c + eos for c in (chosen, rejected)]
        prompt_ids = _ids(tokenizer, prompt)
        full = [_ids(tokenizer, prompt + completion) for completion in completions]
    start = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": full[0][start:], "rejected_ids": full[1][start:]}


def collate_preference(
    examples: Sequence[Mapping[str, Sequence[int]]], *, pad_token_id: int, max_length: int | None = None
) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask``, ``completion_mask`` of shape (2B, T): rows 0..B−1 prompt+chosen, rows
    B..2B−1 prompt+rejected, right-padded, each truncated to ``max_length`` keeping the start."""
    if not examples:
        raise ValueError("collate_preference: got no examples")
    rows, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = list(ex["prompt_ids"]) + list(ex[side])
            completion = [0] * len(ex["prompt_ids"]) + [1] * len(ex[side])
            if max_length is not None:
                ids, completion = ids[:max_length], completion[:max_length]
            rows.append(ids)
            masks.append(completion)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, comp) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        completion_mask[i, : len(comp)] = torch.tensor(comp, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion_mask}


def completion_token_logps(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of each next token, float32 (N, T−1), zero outside the completion, and that mask."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = (completion_mask[:, 1:] * attention_mask[:, 1:]).bool()
    return token_logps.masked_fill(~mask, 0.0), mask


def sequence_logps(token_logps: Tensor, mask: Tensor, *, average: bool = False) -> Tensor:
    """Σ over completion tokens (``average``: divided by their number); (N,)."""
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


class CausalLMAdapter:
    """A causal LM and its reference: a frozen copy (``reference_model``) or, when that is ``None``, the same model
    with its peft adapters disabled (TRL's PEFT path)."""

    def __init__(self, model: torch.nn.Module, *, reference_model: torch.nn.Module | None = None) -> None:
        self.model = model
        self.reference_model = reference_model

    def freeze_reference_copy(self) -> torch.nn.Module:
        """Set ``reference_model`` to a frozen deep copy of the (unwrapped) model; return it."""
        reference = copy.deepcopy(unwrap(self.model)).requires_grad_(False).eval()
        self.reference_model = reference
        return reference

    @contextmanager
    def reference_mode(self) -> Iterator[torch.nn.Module]:
        """Yield the module that computes reference log-probs (the copy, or the model with adapters disabled)."""
        if self.reference_model is not None:
            yield self.reference_model
            return
        if not has_adapters(self.model):
            raise RuntimeError(
                "no reference model: the model has no peft adapters and reference_model is None; add LoRA or call "
                "freeze_reference_copy()"
            )
        with adapters_disabled(self.model):
            yield self.model

    def token_logps(self, batch: Mapping[str, Tensor], *, reference: bool = False) -> tuple[Tensor, Tensor]:
        """(per-token log-probs (2B, T−1), completion mask) of a :func:`collate_preference` batch; the reference
        runs under ``torch.no_grad()``."""
        device = next(unwrap(self.model).parameters()).device
        args = [batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask")]
        if not reference:
            return completion_token_logps(self.model, *args)
        with self.reference_mode() as model, torch.no_grad():
            return completion_token_logps(model, *args)

    def pair_logps(
        self, batch: Mapping[str, Tensor], *, reference: bool = False, average: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) completion log-likelihoods, each (B,), float32."""
        token_logps, mask = self.token_logps(batch, reference=reference)
        logps = sequence_logps(token_logps, mask, average=average)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]
