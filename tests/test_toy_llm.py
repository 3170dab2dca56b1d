"""Toy LLM world: language and gold score, word-level tokenizer and chat template, the tiny Llama, sampling, the
committed base, pretraining and the JSONL data writers."""

from __future__ import annotations

import json
import random

import pytest
import torch

from diffalign.models.causal_lm import tokenize_preference
from diffalign.toy.llm_data import (
    conversational,
    read_jsonl,
    write_preference_pairs,
    write_prompts,
    write_rankings,
    write_unpaired,
)
from diffalign.toy.llm_model import (
    build_toy_tokenizer,
    generate_completions,
    load_toy_lm,
    property_rate,
    score_samples,
    tiny_causal_lm,
)
from diffalign.toy.llm_pretrain import (
    LLM_BASE_CONFIG,
    LLMPretrainConfig,
    default_llm_base_path,
    ensure_llm_base,
    pretrain_lm,
    read_info,
)
from diffalign.toy.llm_world import (
    COLOURS,
    SHAPES,
    VOCABULARY,
    all_prompts,
    gold_score,
    has_property,
    make_completion,
    parse_completion,
    parse_prompt,
    pretraining_corpus,
    sample_prompts,
)

torch.set_num_threads(1)

PROMPT = "describe : red circle =>"


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def base():
    return load_toy_lm(default_llm_base_path())


def test_gold_score_closed_form() -> None:
    cases = {
        "a red circle .": 1.0,
        "a small red circle on the left with a blue background .": 1.0,
        "a blue circle .": 0.5,  # colour wrong
        "a red square at the top .": 0.7,  # shape wrong
        "a red circle": 0.8,  # no final period
        "a red red circle .": 0.8,  # stutter: the colour before the shape is still red
        "a blue star with a red background .": 0.2,  # red only as the background colour
        "circle red": 0.3,  # shape only
        "": 0.0,
    }
    for completion, expected in cases.items():
        assert gold_score(PROMPT, completion) == pytest.approx(expected), completion
    assert has_property(PROMPT, "a huge red heart .") and not has_property(
        PROMPT, "a blue circle with a red background ."
    )
    assert parse_completion("a tiny green star in the middle .") == parse_completion(
        "a tiny green star in the middle ."
    )
    assert parse_completion("a green star in the").well_formed is False
    chat_prompt = [{"role": "user", "content": PROMPT}]
    assert gold_score(chat_prompt, [{"role": "assistant", "content": "a red square ."}]) == pytest.approx(0.7)
    assert parse_prompt(PROMPT) == ("red", "circle")
    with pytest.raises(ValueError):
        parse_prompt("describe : red dog =>")


def test_world_prompts_and_corpus() -> None:
    assert len(all_prompts()) == len(COLOURS) * len(SHAPES) == 40 and len(set(all_prompts())) == 40
    assert len(VOCABULARY) == 34
    assert sample_prompts(5, seed=3) == sample_prompts(9, seed=3)[:5] != sample_prompts(5, seed=4)
    assert pretraining_corpus(5, seed=1) == pretraining_corpus(9, seed=1)[:5]
    clean = pretraining_corpus(300, seed=0, noise=0.0, shape_noise=0.0, malformed=0.0)
    assert all(gold_score(p, c) == 1.0 for p, c in clean)
    noisy = pretraining_corpus(4000, seed=0, noise=0.6)
    rate = sum(has_property(p, c) for p, c in noisy) / len(noisy)
    assert abs(rate - 0.4) < 0.03  # binomial sd 0.008
    wrong = make_completion("red", "circle", random.Random(0), colour_noise=1.0)
    assert parse_completion(wrong).colour not in (None, "red") and parse_completion(wrong).well_formed


def test_tokenizer_round_trip_and_prefix(tokenizer) -> None:
    assert len(tokenizer) == 41 and tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    completion = "a small red circle on the left with a blue background ."
    ids = tokenizer(completion)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 13 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == completion
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(prompt_ids) == ["<s>", "describe", ":", "red", "circle", "=", ">"]
    for joined in (PROMPT + completion, PROMPT + " " + completion, PROMPT + completion + tokenizer.eos_token):
        full = tokenizer(joined)["input_ids"]
        assert full[: len(prompt_ids)] == prompt_ids and full[len(prompt_ids) :] == ids[1:] + [
            tokenizer.eos_token_id
        ] * joined.endswith(tokenizer.eos_token)
    assert tokenizer("a dog")["input_ids"] == [tokenizer.bos_token_id, 11, tokenizer.unk_token_id]


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|> describe : red circle => <|assistant|>"
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "a red circle ."}])
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert full[: len(prompt_ids)] == prompt_ids and len(prompt_ids) == 9
    assert tokenizer.convert_ids_to_tokens(full[len(prompt_ids) :]) == ["a", "red", "circle", ".", "</s>"]
    # Standard and conversational rows give the same completion tokens under TRL-style tokenisation.
    row = {"prompt": PROMPT, "chosen": "a red circle .", "rejected": "a blue star ."}
    standard = tokenize_preference(tokenizer, row["prompt"], row["chosen"], row["rejected"])
    chat_row = conversational(row)
    chat = tokenize_preference(tokenizer, chat_row["prompt"], chat_row["chosen"], chat_row["rejected"])
    assert standard["chosen_ids"] == chat["chosen_ids"] and standard["rejected_ids"] == chat["rejected_ids"]
    assert standard["prompt_ids"] == tokenizer(PROMPT)["input_ids"] and chat["prompt_ids"] == prompt_ids


def test_tiny_model_builds_saves_and_loads(tokenizer, tmp_path) -> None:
    model = tiny_causal_lm(tokenizer, seed=0).eval()
    assert sum(p.numel() for p in model.parameters()) == 84864
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    state = torch.random.get_rng_state()
    again = tiny_causal_lm(tokenizer, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_toy_lm(tmp_path)
    ids = torch.tensor([tokenizer(PROMPT + " a red circle .")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert loaded_tokenizer(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert loaded_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False) == (
        "<s><|user|> describe : red circle => "
    )


def test_generation_is_deterministic_and_prompt_major(base) -> None:
    model, tokenizer = base
    prompts = ["describe : red circle =>", "describe : blue star =>"]
    state = torch.random.get_rng_state()
    a = generate_completions(model, tokenizer, prompts, n_per_prompt=6, seed=0, batch_size=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == generate_completions(model, tokenizer, prompts, n_per_prompt=6, seed=0, batch_size=5)
    assert a != generate_completions(model, tokenizer, prompts, n_per_prompt=6, seed=1, batch_size=5)
    assert len(a) == 12 and all("<" not in c for c in a)
    # The base names the prompted shape most of the time: samples are grouped by prompt.
    assert sum(parse_completion(c).shape == "circle" for c in a[:6]) >= 3
    assert sum(parse_completion(c).shape == "star" for c in a[6:]) >= 3
    chat = generate_completions(model, tokenizer, [[{"role": "user", "content": prompts[0]}]], n_per_prompt=4)
    assert sum(parse_completion(c).well_formed for c in chat) >= 2


def test_committed_base_is_current_and_in_band(base) -> None:
    info = read_info(default_llm_base_path())
    assert info is not None and info["hash"] == LLM_BASE_CONFIG.hash()
    assert ensure_llm_base() == default_llm_base_path()
    size = sum(f.stat().st_size for f in default_llm_base_path().iterdir())
    assert size < 2_000_000
    for seed in (0, 1, 2):
        assert 0.25 <= info["eval"][f"seed{seed}"]["property_rate"] <= 0.55
    model, tokenizer = base
    metrics = property_rate(model, tokenizer, n_per_prompt=4, seed=0)
    assert len(metrics["samples"]) == 160
    assert 0.25 <= metrics["property_rate"] <= 0.55  # at 160 samples, sd ≈ 0.04 around the measured ≈ 0.4
    assert 0.5 <= metrics["gold_score"] <= 0.75 and metrics["well_formed_rate"] >= 0.8
    assert metrics["shape_rate"] >= 0.65 and metrics["diversity"] >= 0.8


def test_score_samples_closed_form() -> None:
    prompts = [PROMPT, "describe : blue star =>"]
    completions = ["a red circle .", "a red circle .", "a blue square", "a green star ."]
    m = score_samples(prompts, completions, 2)
    assert m["property_rate"] == 0.75 and m["gold_score"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert m["shape_rate"] == 0.75 and m["well_formed_rate"] == 0.75 and m["diversity"] == 0.75


def test_pretrain_smoke(tmp_path) -> None:
    config = LLMPretrainConfig(steps=3, batch_size=8, n_examples=32)
    path = pretrain_lm(config, tmp_path / "lm", progress=False, eval_n_per_prompt=0)
    info = json.loads((path / "pretrain.json").read_text())
    assert info["hash"] == config.hash() != LLM_BASE_CONFIG.hash() and info["config"]["steps"] == 3
    model, tokenizer = load_toy_lm(path)
    assert model.config.vocab_size == len(tokenizer) == 41


def test_data_writers(tmp_path) -> None:
    base = default_llm_base_path()
    pairs = write_preference_pairs(tmp_path / "pairs.jsonl", base, n=24, seed=0)
    assert read_jsonl(tmp_path / "pairs.jsonl") == pairs and 12 <= len(pairs) <= 24
    for row in pairs:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert gold_score(row["prompt"], row["chosen"]) > gold_score(row["prompt"], row["rejected"])
    rankings = write_rankings(tmp_path / "rank.jsonl", base, n=16, seed=1, n_responses=4)
    assert read_jsonl(tmp_path / "rank.jsonl") == rankings and 8 <= len(rankings) <= 16
    for row in rankings:
        assert len(row["responses"]) == len(row["scores"]) == 4 and row["scores"] == sorted(row["scores"], reverse=True)
        assert (
            row["scores"] == [gold_score(row["prompt"], r) for r in row["responses"]]
            and row["scores"][0] > row["scores"][-1]
        )
    unpaired = write_unpaired(tmp_path / "unpaired.jsonl", base, n=32, seed=2)
    assert len(unpaired) == 32 and all(r["label"] == has_property(r["prompt"], r["completion"]) for r in unpaired)
    assert 0 < sum(r["label"] for r in unpaired) < 32
    prompts = write_prompts(tmp_path / "prompts.jsonl", n=10, seed=3)
    assert prompts == [{"prompt": p} for p in sample_prompts(10, 3)] == read_jsonl(tmp_path / "prompts.jsonl")
    chat = conversational(rankings[0])
    assert chat["prompt"] == [{"role": "user", "content": rankings[0]["prompt"]}]
    assert chat["responses"][0] == [{"role": "assistant", "content": rankings[0]["responses"][0]}]
    assert chat["scores"] == rankings[0]["scores"] and conversational(chat) == chat
