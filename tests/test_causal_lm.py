"""Causal LMs: TRL-style tokenisation, completion log-probs against a hand loop, padding invariance, and the
reference through its strategies (:mod:`diffalign.trainers.reference`): LoRA adapters disabled, or a frozen copy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers_llm import tiny_llama_config
from helpers_losses import pair_loss
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from diffalign.losses import get_loss
from diffalign.models.causal_lm import (
    collate_preference,
    common_prefix_length,
    completion_token_stats,
    sequence_logps,
    tokenize_preference,
)
from diffalign.models.clip_tokenizer import build_clip_tokenizer
from diffalign.trainers.reference import AdaptersDisabled, FrozenCopy

CHAT_TEMPLATE = (
    "{% for m in messages %}<|startoftext|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|startoftext|>assistant:{% endif %}"
)


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs (2B, T−1), completion mask) of a :func:`collate_preference` batch under ``model``."""
    stats = completion_token_stats(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], with_details=False
    )
    return stats.logps, stats.mask


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-likelihoods, each (B,), float32: the trainers' reference forward."""
    logps = sequence_logps(*token_logps(model, batch))
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(model_max_length=64)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(49408)).eval()


def test_standard_examples_get_eos_and_split_at_the_common_prefix(tokenizer):
    out = tokenize_preference(tokenizer, "a red", " circle", " square please")
    full = tokenizer("a red circle" + tokenizer.eos_token)["input_ids"]
    assert out["prompt_ids"] + out["chosen_ids"] == full[: len(out["prompt_ids"]) + len(out["chosen_ids"])]
    assert out["chosen_ids"][-1] == tokenizer.eos_token_id and out["rejected_ids"][-1] == tokenizer.eos_token_id
    prompt = tokenizer("a red")["input_ids"]
    # the CLIP tokenizer ends every text with its EOS: the prompt's own EOS is not a prefix of prompt + completion
    assert len(out["prompt_ids"]) == common_prefix_length(prompt, full) == len(prompt) - 1


def test_conversational_examples_use_the_chat_template(tokenizer):
    tok = build_clip_tokenizer(model_max_length=64)
    tok.chat_template = CHAT_TEMPLATE
    prompt = [{"role": "user", "content": "colour?"}]
    out = tokenize_preference(
        tok, prompt, [{"role": "assistant", "content": "red"}], [{"role": "assistant", "content": "blue"}]
    )
    expected_prompt = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    expected_prompt = expected_prompt if isinstance(expected_prompt, list) else expected_prompt["input_ids"]
    n = len(out["prompt_ids"])
    assert out["prompt_ids"] == list(expected_prompt)[:n] and n > 0
    with pytest.raises(ValueError, match="all be strings or all be lists"):
        tokenize_preference(tok, prompt, "red", "blue")


def test_completion_logps_equal_a_hand_loop_and_ignore_padding(tokenizer, model):
    examples = [
        tokenize_preference(tokenizer, "a red", " circle", " blue square on grey"),
        tokenize_preference(tokenizer, "draw a big yellow", " triangle", " circle"),
    ]
    batch = collate_preference(examples, pad_token_id=tokenizer.pad_token_id)
    chosen, rejected = pair_logps(model, batch)
    # hand loop over each unpadded sequence on its own
    with torch.no_grad():
        for i, (ex, side) in enumerate([(e, s) for s in ("chosen_ids", "rejected_ids") for e in examples]):
            ids = torch.tensor([ex["prompt_ids"] + ex[side]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            start = len(ex["prompt_ids"])
            expected = sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
            got = (chosen if side == "chosen_ids" else rejected)[i % 2].item()
            assert got == pytest.approx(expected, abs=1e-4)
    logps, mask = token_logps(model, batch)
    lengths = mask.sum(-1).float()
    averaged = sequence_logps(logps, mask, average=True)
    torch.testing.assert_close(averaged, torch.cat([chosen, rejected]) / lengths)
    truncated = collate_preference(examples, pad_token_id=tokenizer.pad_token_id, max_length=4)
    assert truncated["input_ids"].shape[1] == 4


def test_reference_by_adapters_disabled_or_frozen_copy_and_dpo_ln2(tokenizer, model):
    examples = [tokenize_preference(tokenizer, "a red", " circle", " square")]
    batch = collate_preference(examples, pad_token_id=tokenizer.pad_token_id)

    def forward(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logps(module, batch)

    with torch.no_grad():
        base = pair_logps(model, batch)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    reference = AdaptersDisabled(peft_model)
    pol = pair_logps(peft_model, batch)
    ref = reference.logps(batch, 0, forward)
    assert pol[0].requires_grad and not ref[0].requires_grad
    dpo = get_loss("trl_sigmoid")
    out = pair_loss(dpo, pol, ref, beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    moved = pair_logps(peft_model, batch)
    ref_after = reference.logps(batch, 0, forward)
    torch.testing.assert_close(torch.stack(ref_after), torch.stack(base), atol=1e-5, rtol=0)
    assert (torch.stack(moved).detach() - torch.stack(base)).abs().max() > 1e-3
    policy = copy.deepcopy(model)  # a full fine-tune: the reference is a frozen copy of the initial weights
    frozen = FrozenCopy.of(policy, "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.testing.assert_close(torch.stack(frozen.logps(batch, 0, forward)), torch.stack(base))
    assert (torch.stack(forward(policy)).detach() - torch.stack(base)).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="no peft adapters"):
        AdaptersDisabled(model).logps(batch, 0, forward)
