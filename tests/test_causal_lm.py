"""The causal-LM adapter: TRL-style tokenisation, completion log-probs against a hand loop, padding invariance,
and the reference as a frozen copy or with LoRA adapters disabled."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from diffalign.losses import get_loss
from diffalign.models.causal_lm import (
    CausalLMAdapter,
    collate_preference,
    common_prefix_length,
    sequence_logps,
    tokenize_preference,
)
from diffalign.models.clip_tokenizer import build_clip_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|startoftext|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|startoftext|>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(model_max_length=64)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


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
    adapter = CausalLMAdapter(model)
    chosen, rejected = adapter.pair_logps(batch)
    # hand loop over each unpadded sequence on its own
    with torch.no_grad():
        for i, (ex, side) in enumerate([(e, s) for s in ("chosen_ids", "rejected_ids") for e in examples]):
            ids = torch.tensor([ex["prompt_ids"] + ex[side]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            start = len(ex["prompt_ids"])
            expected = sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
            got = (chosen if side == "chosen_ids" else rejected)[i % 2].item()
            assert got == pytest.approx(expected, abs=1e-4)
    token_logps, mask = adapter.token_logps(batch)
    lengths = mask.sum(-1).float()
    averaged = sequence_logps(token_logps, mask, average=True)
    torch.testing.assert_close(averaged, torch.cat([chosen, rejected]) / lengths)
    truncated = collate_preference(examples, pad_token_id=tokenizer.pad_token_id, max_length=4)
    assert truncated["input_ids"].shape[1] == 4


def test_reference_by_adapters_disabled_or_frozen_copy_and_dpo_ln2(tokenizer, model):
    examples = [tokenize_preference(tokenizer, "a red", " circle", " square")]
    batch = collate_preference(examples, pad_token_id=tokenizer.pad_token_id)
    base = CausalLMAdapter(model).pair_logps(batch)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = CausalLMAdapter(peft_model)
    pol = adapter.pair_logps(batch)
    ref = adapter.pair_logps(batch, reference=True)
    dpo = get_loss("trl_sigmoid")
    out = dpo(
        policy_chosen_logps=pol[0],
        policy_rejected_logps=pol[1],
        reference_chosen_logps=ref[0],
        reference_rejected_logps=ref[1],
        beta=0.1,
    )
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    moved = adapter.pair_logps(batch)
    ref_after = adapter.pair_logps(batch, reference=True)
    torch.testing.assert_close(torch.stack(ref_after), torch.stack(base), atol=1e-5, rtol=0)
    assert (torch.stack(moved) - torch.stack(base)).abs().max() > 1e-3
    copy_adapter = CausalLMAdapter(model)
    copy_adapter.freeze_reference_copy()
    torch.testing.assert_close(torch.stack(copy_adapter.pair_logps(batch, reference=True)), torch.stack(base))
    with pytest.raises(RuntimeError, match="no reference model"):
        CausalLMAdapter(model).pair_logps(batch, reference=True)
