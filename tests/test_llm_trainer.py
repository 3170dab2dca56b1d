"""The causal-LM trainers: each data layout's loss equals the loss function applied to independently computed
log-likelihoods; precomputed reference == frozen copy; resume == uninterrupted; 1 process == 2 processes;
conversational data; clear data / config errors; GRPO's on-policy loss in closed form and reproducible rollouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_llm import tiny_llama_config
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from diffalign.config import ConfigError, config_from_dict
from diffalign.data.llm import TextDataError, load_text_rows
from diffalign.losses import get_loss
from diffalign.losses.advantages import group_advantages
from diffalign.models.clip_tokenizer import build_clip_tokenizer
from diffalign.models.reference import adapters_disabled
from diffalign.trainers.llm_grpo import LLMGRPOTrainer
from diffalign.trainers.llm_preference import LLMPreferenceTrainer
from diffalign.trainers.metrics import read_metrics

CHAT_TEMPLATE = (
    "{% for m in messages %}<|startoftext|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|startoftext|>assistant:{% endif %}"
)
COLOURS = ("red", "blue", "green", "pink")
SHAPES = ("circle", "square")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_clip_tokenizer(model_max_length=64)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("llm_data")
    pairs = [
        {"prompt": f"a {c}", "chosen": f" {s} please", "rejected": f" {s}", "preference_probs": 0.8}
        for c in COLOURS
        for s in SHAPES
    ]
    rankings = [
        {"prompt": p["prompt"], "responses": [p["rejected"], p["chosen"], " no"], "scores": [0.5, 1.0, 0.0]}
        for p in pairs
    ]
    unpaired = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    chat = [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": p["rejected"].strip()}],
        }
        for p in pairs
    ]
    prompts = [{"prompt": f"a {c}", "colour": c} for c in COLOURS]
    return {
        "pairs": _write(folder / "pairs.jsonl", pairs),
        "rankings": _write(folder / "rankings.jsonl", rankings),
        "unpaired": _write(folder / "unpaired.jsonl", unpaired),
        "chat": _write(folder / "chat.jsonl", chat),
        "prompts": _write(folder / "prompts.jsonl", prompts),
    }


def make_config(tiny_lm: Path, data_path: Path, output_dir: Path, **sections: dict) -> object:
    raw = {
        "model": {"backbone": "causal_lm", "pretrained": str(tiny_lm)},
        "data": {"path": str(data_path), "max_length": 32},
        "loss": {"name": "trl_sigmoid", "beta": 0.5},
        "lora": {"enabled": True, "rank": 4},
        "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "train": {
            "method": "preference",
            "max_steps": 2,
            "train_batch_size": 4,
            "output_dir": str(output_dir),
            "progress_bar": False,
            "checkpointing_steps": 100,
        },
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def completion_logp(model: torch.nn.Module, tokenizer, prompt: str, completion: str) -> torch.Tensor:
    """Σ log p(completion tokens | prompt), one example at a time, no padding (the independent computation)."""
    prompt_ids = tokenizer(prompt)["input_ids"][:-1]  # the CLIP tokenizer ends every text with its EOS
    full = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    token = logps.gather(-1, targets[:, None]).squeeze(-1)
    return token[len(prompt_ids) - 1 :].sum()


def _built(config) -> LLMPreferenceTrainer:
    trainer = LLMPreferenceTrainer(config)
    trainer.build()
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference so that every term matters
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return trainer


def _batch(trainer, n: int = 4) -> dict:
    return trainer.collate([trainer.dataset[i] for i in range(n)])


def _logps(trainer, prompt: str, completion: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        policy = completion_logp(trainer.model, trainer.tokenizer, prompt, completion)
        with adapters_disabled(trainer.model):
            reference = completion_logp(trainer.model, trainer.tokenizer, prompt, completion)
    return policy, reference


@pytest.mark.parametrize("loss_name", ["trl_sigmoid", "trl_ipo", "simpo", "irepo"])
def test_pair_losses_equal_the_loss_on_independent_logps(tiny_lm, data, tmp_path, loss_name) -> None:
    beta = {"simpo": 2.0}.get(loss_name, 0.5)
    trainer = _built(make_config(tiny_lm, data["pairs"], tmp_path, loss={"name": loss_name, "beta": beta}))
    rows = trainer.dataset.rows[:4]
    pol_c, ref_c = zip(*(_logps(trainer, r["prompt"], r["chosen"]) for r in rows), strict=True)
    pol_r, ref_r = zip(*(_logps(trainer, r["prompt"], r["rejected"]) for r in rows), strict=True)
    lengths = lambda side: torch.tensor(  # noqa: E731
        [float(len(trainer.dataset[i]["completion_ids"][side])) for i in range(4)]
    )
    kwargs = {
        "policy_chosen_logps": torch.stack(pol_c),
        "policy_rejected_logps": torch.stack(pol_r),
        "reference_chosen_logps": torch.stack(ref_c),
        "reference_rejected_logps": torch.stack(ref_r),
        "chosen_lengths": lengths(0),
        "rejected_lengths": lengths(1),
        "preference_probs": torch.full((4,), 0.8),
        "beta": beta,
    }
    fn = get_loss(loss_name)
    accepted = set(__import__("inspect").signature(fn).parameters)
    expected = fn(**{k: v for k, v in kwargs.items() if k in accepted}).losses.mean()
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(_batch(trainer), epoch=0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert metrics["logps/chosen"] == pytest.approx(torch.stack(pol_c), abs=1e-4)
    if loss_name in ("trl_sigmoid", "trl_ipo"):  # TRL's logged rewards: β·(policy − reference)
        assert metrics["rewards/chosen"] == pytest.approx(beta * (torch.stack(pol_c) - torch.stack(ref_c)), abs=1e-4)


def test_rankings_and_unpaired_losses_equal_the_loss_on_independent_logps(tiny_lm, data, tmp_path) -> None:
    # PRO on whole ranked lists (sorted best first by score)
    trainer = _built(make_config(tiny_lm, data["rankings"], tmp_path / "pro", loss={"name": "pro", "params": {}}))
    rows = trainer.dataset.rows[:4]
    assert rows[0]["scores"] == [1.0, 0.5, 0.0]
    logps = torch.stack([torch.stack([_logps(trainer, r["prompt"], c)[0] for c in r["responses"]]) for r in rows])
    lengths = torch.tensor([[float(len(ids)) for ids in trainer.dataset[i]["completion_ids"]] for i in range(4)])
    expected = get_loss("pro")(
        policy_logps=logps, lengths=lengths, rewards=torch.tensor([r["scores"] for r in rows])
    ).losses.mean()
    with torch.no_grad():
        loss, _ = trainer.compute_loss(_batch(trainer), epoch=0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # KTO: log-ratios, labels and z0 = max(0, mean r) over the batch
    trainer = _built(make_config(tiny_lm, data["unpaired"], tmp_path / "kto", loss={"name": "kto", "beta": 0.5}))
    rows = trainer.dataset.rows[:4]
    pol, ref = (
        torch.stack(v) for v in zip(*(_logps(trainer, r["prompt"], r["completion"]) for r in rows), strict=True)
    )
    labels = torch.tensor([float(r["label"]) for r in rows])
    expected = get_loss("kto")(policy_logps=pol, reference_logps=ref, labels=labels, beta=0.5).losses.mean()
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(_batch(trainer), epoch=0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isnan(metrics["rewards/chosen"][~labels.bool()]).all()  # TRL: rewards/chosen over desirable only


def test_precomputed_reference_equals_frozen_copy_and_resume_is_exact(tiny_lm, data, tmp_path) -> None:
    full = {"enabled": False}
    train = {"max_steps": 4, "train_batch_size": 2, "checkpointing_steps": 2}
    copy_run = make_config(tiny_lm, data["pairs"], tmp_path / "copy", lora=full, train=train)
    pre_run = make_config(
        tiny_lm, data["pairs"], tmp_path / "pre", lora=full, train={**train, "reference": "precomputed"}
    )
    LLMPreferenceTrainer(copy_run).train()
    LLMPreferenceTrainer(pre_run).train()
    a, b = read_metrics(tmp_path / "copy"), read_metrics(tmp_path / "pre")
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # bit for bit: the 4 steps are epoch 0, whose training batches are exactly the pass's chunks (same padding)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert list((tmp_path / "pre" / "reference_logps").glob("*.safetensors"))

    # interrupted after step 2 (its checkpoint), resumed to 4 == uninterrupted
    stopped = make_config(tiny_lm, data["pairs"], tmp_path / "resumed", lora=full, train={**train, "max_steps": 2})
    LLMPreferenceTrainer(stopped).train()
    resumed = make_config(
        tiny_lm, data["pairs"], tmp_path / "resumed", lora=full, train={**train, "resume_from_checkpoint": "latest"}
    )
    LLMPreferenceTrainer(resumed).train()
    final_a = load_file(str(tmp_path / "copy" / "model.safetensors"))
    final_b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert [m["loss"] for m in read_metrics(tmp_path / "resumed")] == [m["loss"] for m in a]


def test_two_processes_equal_one(tiny_lm, data, tmp_path, run_train_script) -> None:
    """2 processes x batch 2 == 1 process x batch 2 x 2 accumulation steps, bit for bit (the same micro-batches, so
    the same padding; the gradient (g0 + g1) / 2 is exact either way). One process at batch 4 pads to another length
    and rounds differently, so it is not the exact counterpart."""

    def args(out: Path, accumulation: int) -> list[str]:
        train = {"train_batch_size": 2, "gradient_accumulation_steps": accumulation, "max_steps": 3}
        config = make_config(tiny_lm, data["pairs"], out, train=train)
        from diffalign.config import save_config

        path = save_config(config, tmp_path / f"{out.name}.yaml")
        return ["--config", str(path)]

    one = run_train_script(args(tmp_path / "one", 2))
    two = run_train_script(args(tmp_path / "two", 1), processes=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [read_metrics(tmp_path / name) for name in ("one", "two")]
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [m[key] for m in metrics[0]] == [m[key] for m in metrics[1]], key
    assert len({m["loss"] for m in metrics[0]}) == 3  # the loss moved: a real comparison


def test_precomputed_reference_on_two_processes_stores_what_one_stores(
    tiny_lm, data, tmp_path, run_train_script
) -> None:
    """LoRA precomputed: 2 processes x batch 2 store exactly the values 1 process x batch 2 x 2 accumulation steps
    stores (each process computes its chunks of epoch 0's order) and train the same; and LoRA precomputed == LoRA auto
    bit for bit (the 2 steps are epoch 0: the pass's chunks are the training batches)."""
    train = {"train_batch_size": 2, "max_steps": 2, "reference": "precomputed"}
    one = make_config(tiny_lm, data["pairs"], tmp_path / "one", train={**train, "gradient_accumulation_steps": 2})
    LLMPreferenceTrainer(one).train()
    auto = {**train, "gradient_accumulation_steps": 2, "reference": "auto"}
    LLMPreferenceTrainer(make_config(tiny_lm, data["pairs"], tmp_path / "auto", train=auto)).train()
    from diffalign.config import save_config

    two = make_config(tiny_lm, data["pairs"], tmp_path / "two", train=train)
    launched = run_train_script(["--config", str(save_config(two, tmp_path / "two.yaml"))], processes=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    (a,) = (tmp_path / "one" / "reference_logps").glob("*.safetensors")
    (b,) = (tmp_path / "two" / "reference_logps").glob("*.safetensors")
    assert a.name == b.name and torch.equal(load_file(str(a))["reference"], load_file(str(b))["reference"])
    metrics = {name: read_metrics(tmp_path / name) for name in ("one", "two", "auto")}
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert [m[key] for m in metrics["one"]] == [m[key] for m in metrics["two"]] == [m[key] for m in metrics["auto"]]
    assert metrics["one"][1]["loss"] != metrics["one"][0]["loss"]  # step 2 is off the reference: a real comparison


def test_reference_pass_shares_uneven_chunks_with_equal_forward_counts(tiny_lm, data, tmp_path) -> None:
    """8 examples in chunks of 3 over 2 processes: process 1's second chunk repeats the last one, so both run two
    forwards; together they cover every example with exactly the one-process values."""
    from diffalign.trainers.reference_store import ProcessGroup

    config = make_config(tiny_lm, data["pairs"], tmp_path, lora={"enabled": False}, train={"reference": "precomputed"})
    config.train.train_batch_size = 3
    trainer = LLMPreferenceTrainer(config)
    trainer.build()
    forwards: list[list[int]] = []
    collate = trainer.collate

    def counting_collate(items: list[dict]) -> dict:
        forwards.append([item["index"] for item in items])
        return collate(items)

    trainer.collate = counting_collate
    alone = trainer.reference_pass(ProcessGroup())
    assert len(forwards) == 3
    chunks = list(forwards)
    shares, per_rank = [], []
    for rank in range(2):
        forwards.clear()
        shares.append(trainer.reference_pass(ProcessGroup(2, rank)))  # the gather returns only its own share
        per_rank.append(list(forwards))
    assert per_rank == [[chunks[0], chunks[2]], [chunks[1], chunks[2]]]  # process 1 repeats the last chunk
    covered = (shares[0] != 0).all(dim=1) | (shares[1] != 0).all(dim=1)
    assert covered.all()
    assert torch.equal(torch.where((shares[0] != 0).all(dim=1, keepdim=True), shares[0], shares[1]), alone)


def test_conversational_pairs_train_through_the_chat_template(tiny_lm, data, tmp_path) -> None:
    trainer = _built(make_config(tiny_lm, data["chat"], tmp_path))
    item = trainer.dataset[0]
    prompt = trainer.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a red"}], tokenize=True, add_generation_prompt=True
    )
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert item["prompt_ids"] == prompt[: len(item["prompt_ids"])]
    assert trainer.tokenizer.decode(item["completion_ids"][0], skip_special_tokens=True).strip() == "circle please"
    with torch.no_grad():
        loss, _ = trainer.compute_loss(_batch(trainer), epoch=0)
    assert math.isfinite(loss.item()) and loss.item() != pytest.approx(math.log(2))  # the policy was perturbed


def test_bad_rows_are_reported_with_their_row_numbers(tmp_path) -> None:
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": "b"},
            {"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "c"},
        ],
    )
    with pytest.raises(TextDataError) as err:
        load_text_rows(str(path), "pairs")
    message = str(err.value)
    assert f"{path}: row 1: 'rejected' is missing" in message
    assert f"{path}: row 2: 'chosen' must be a string" in message or f"{path}: row 2: mixes strings" in message
    assert len(load_text_rows(str(path), "pairs", on_bad_row="skip")) == 1
    ranked = _write(tmp_path / "rank.jsonl", [{"prompt": "a", "responses": ["x", "y"], "scores": [1.0]}])
    with pytest.raises(TextDataError, match="row 0: 'scores' must be a list with one number per response"):
        load_text_rows(str(ranked), "rankings")


def test_config_rules_for_causal_lms(tiny_lm, data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="do not go together"):
        make_config(tiny_lm, data["pairs"], tmp_path, train={"method": "dpo"})
    raw = {
        "model": {"backbone": "causal_lm", "pretrained": str(tiny_lm)},
        "data": {"path": str(data["pairs"])},
        "train": {"method": "preference"},
    }
    with pytest.raises(ConfigError, match="needs an explicit 'loss.beta'"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="takes its objective from the 'online' section"):
        config_from_dict({**raw, "train": {"method": "grpo"}, "loss": {"beta": 0.1}})


# ---------------------------------------------------------------------------------------------------------- GRPO


def colour_reward(prompts: list[str], completions: list[str], colour: list[str], **_) -> list[float]:
    """Fraction of the completion's characters that occur in the prompt's colour name (graded: groups rarely tie;
    reads the dataset's extra ``colour`` column, as TRL passes columns to reward functions)."""
    return [sum(ch in c for ch in text) / max(len(text), 1) for text, c in zip(completions, colour, strict=True)]


def constant_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    return [0.5] * len(completions)


def grpo_config(tiny_lm: Path, data: dict, out: Path, **online) -> object:
    return config_from_dict(
        {
            "model": {"backbone": "causal_lm", "pretrained": str(tiny_lm)},
            "data": {"path": str(data["prompts"])},
            "lora": {"enabled": True, "rank": 4},
            "online": {
                "reward_functions": [f"{__file__}:colour_reward"],
                "num_generations": 4,
                "max_new_tokens": 6,
                **online,
            },
            "train": {
                "method": "grpo",
                "max_steps": 1,
                "train_batch_size": 2,
                "output_dir": str(out),
                "progress_bar": False,
            },
        }
    )


def test_grpo_rollouts_are_reproducible_and_the_on_policy_loss_is_closed_form(tiny_lm, data, tmp_path) -> None:
    trainer = LLMGRPOTrainer(grpo_config(tiny_lm, data, tmp_path, loss_type="dapo"))
    trainer.build()
    rows = [trainer.dataset[i] for i in range(2)]
    first = trainer.generate([r["prompt"] for r in rows], seed=5)
    assert trainer.generate([r["prompt"] for r in rows], seed=5) == first
    assert trainer.generate([r["prompt"] for r in rows], seed=6)[1] != first[1]

    batch = trainer.collate(rows)
    loss, metrics = trainer.compute_loss(batch, epoch=0)
    # the same rollouts again, scored by hand: on-policy the ratio is 1, so the DAPO loss is −Σ A·|y| / Σ |y|
    from diffalign.utils.randomness import sample_key

    _, completions = trainer.generate([r["prompt"] for r in rows], sample_key(0, 0, 0, 23))
    texts = trainer.tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = torch.tensor(colour_reward([], texts, [r["colour"] for r in rows for _ in range(4)]))
    advantages = group_advantages(rewards, 4)
    assert advantages.abs().sum() > 1.0  # a non-trivial check
    lengths = torch.tensor([float(len(c)) for c in completions])
    assert loss.item() == pytest.approx(-(advantages * lengths).sum().item() / lengths.sum().item(), abs=1e-5)
    assert metrics["reward"] == pytest.approx(rewards, abs=1e-6)
    assert metrics["ratio/mean"].item() == pytest.approx(1.0)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_grpo_with_a_constant_reward_learns_nothing(tiny_lm, data, tmp_path) -> None:
    trainer = LLMGRPOTrainer(grpo_config(tiny_lm, data, tmp_path, reward_functions=[f"{__file__}:constant_reward"]))
    trainer.build()
    loss, metrics = trainer.compute_loss(trainer.collate([trainer.dataset[i] for i in range(2)]), epoch=0)
    assert loss.item() == 0.0 and metrics["frac_reward_zero_std"].mean().item() == 1.0


def test_fsdp2_full_fine_tune_trains_as_one_process_and_exports_loadable_weights(
    tiny_lm, data, tmp_path, run_train_script
) -> None:
    """FSDP2 on 2 gloo processes (configs/accelerate/fsdp.yaml; policy and frozen reference copy sharded) against 1
    process x 2 accumulation steps: the per-block backward hooks sum gradients in another order, so the runs agree
    to float rounding, not bit for bit (measured: weights 1.4e-8, step-3 loss 3.6e-7 relative)."""
    from transformers import AutoModelForCausalLM

    from diffalign.config import save_config

    full = {"enabled": False}
    for name, processes, accumulation in (("one", 1, 2), ("two", 2, 1)):
        train = {"train_batch_size": 2, "max_steps": 3, "gradient_accumulation_steps": accumulation}
        config = make_config(tiny_lm, data["pairs"], tmp_path / name, lora=full, train=train)
        config.optim.adam_epsilon = 1.0  # updates linear in the gradient: rounding stays rounding (no sign(g) steps)
        argv = ["--config", str(save_config(config, tmp_path / f"{name}.yaml"))]
        fsdp = {"processes": 2, "accelerate_config": "fsdp.yaml"} if processes == 2 else {}
        done = run_train_script(argv, **fsdp)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("one", "two"))
    assert type(two).__name__ == "LlamaForCausalLM"  # not fully_shard's FSDPLlamaForCausalLM
    a, b = one.state_dict(), two.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    assert max((b[k] - base[k]).abs().max().item() for k in b) > 1e-3  # it trained
    losses = [[m["loss"] for m in read_metrics(tmp_path / name)] for name in ("one", "two")]
    assert losses[0][0] == losses[1][0] and losses[1] == pytest.approx(losses[0], rel=5e-6)
