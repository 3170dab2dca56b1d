"""Pretraining of the toy LM (:mod:`diffalign.toy.llm_model`) on the noisy corpus of :mod:`diffalign.toy.llm_world`.

Data: ``pretraining_corpus(n_examples, seed, noise)``: a fixed set of prompt/completion pairs whose completion names
a wrong colour with probability ``noise`` (and a wrong shape with probability ``shape_noise``, malformed with
probability ``malformed``). Item ``i`` is rendered in the chat template with probability ``chat_fraction`` (drawn
once per item), else as the standard text ``<s> prompt completion </s>``, so the base serves both data formats.

Objective: next-token cross-entropy over the whole sequence (prompt and completion, padding masked), AdamW, a linear
warm-up then a cosine to ``min_lr_ratio · lr`` (the schedule of :mod:`diffalign.toy.pretrain`). Epoch ``e``'s data
order is a permutation keyed by ``(seed, e)``; parameter init is seeded by ``seed``: a run is deterministic given its
config (on one machine / torch build).

The committed base (``diffalign/toy/weights/llm_base``, :data:`LLM_BASE_CONFIG`) records its config hash and
measured metrics in ``pretrain.json``; :func:`ensure_llm_base` uses it only while that hash matches the code's.

Measured for :data:`LLM_BASE_CONFIG` (shared 2-core CPU, one thread): 107 s of pretraining alone, 169 s beside
other jobs (4000 steps of 64); weights 0.34 MB. Property rate (right colour) on the 40 prompts × 8 samples, sampling
seeds 0 / 1 / 2: 0.40 / 0.41 / 0.36 (chat form, seed 0: 0.39), i.e. the corpus's ``1 - noise``; gold score
0.62 / 0.64 / 0.60, shape 0.80 / 0.83 / 0.82, well formed 0.92 / 0.93 / 0.90. The colour is learnt late: after
1200 steps the rate is still at chance (0.12 ≈ 1/8) while the shape is already learnt; 3000 steps give 0.27
(lr 1e-3) or 0.31 (lr 5e-3), 5000 steps 0.41 (as 4000; init seed 1 at 4000 steps: 0.43). A 100-step SFT on clean
completions (batch 32, lr 1e-3) lifts the base to 0.96 / 0.97 / 0.96: the property is learnable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from diffalign.toy.llm_model import (
    ARCHITECTURE,
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_toy_tokenizer,
    property_rate,
    tiny_causal_lm,
)
from diffalign.toy.llm_world import VOCABULARY, all_prompts, pretraining_corpus
from diffalign.toy.pretrain import check_unit_interval, ensure_pretrained, train_steps
from diffalign.utils.randomness import per_sample_uniform, sample_generator

INFO_FILE = "pretrain.json"
CHAT_STREAM = 220
SHUFFLE_STREAM = 221
EVAL_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class LLMPretrainConfig:
    """Settings of one toy-LM pretraining run (the committed base uses :data:`LLM_BASE_CONFIG`)."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    n_examples: int = 20000
    noise: float = 0.6
    shape_noise: float = 0.2
    malformed: float = 0.1
    chat_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        check_unit_interval(self, "noise", "shape_noise", "malformed", "chat_fraction")
        if self.steps < 1 or self.batch_size < 1 or self.n_examples < self.batch_size:
            raise ValueError(
                f"steps={self.steps}, batch_size={self.batch_size}, n_examples={self.n_examples}: need steps >= 1 "
                "and n_examples >= batch_size >= 1"
            )

    def hash(self) -> str:
        """Short stable digest of the config, the architecture, the tokenizer and a sample of the corpus (so a change
        to the language invalidates a saved base)."""
        corpus = pretraining_corpus(32, self.seed, self.noise, shape_noise=self.shape_noise, malformed=self.malformed)
        key = {
            "config": asdict(self),
            "architecture": ARCHITECTURE,
            "tokens": [*SPECIAL_TOKENS, *VOCABULARY],
            "chat_template": CHAT_TEMPLATE,
            "corpus": corpus,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


LLM_BASE_CONFIG = LLMPretrainConfig()


def encode_corpus(config: LLMPretrainConfig, tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    """Token ids of every corpus item, standard or chat form (see the module docstring), with the closing ``</s>``."""
    corpus = pretraining_corpus(
        config.n_examples, config.seed, config.noise, shape_noise=config.shape_noise, malformed=config.malformed
    )
    chat = per_sample_uniform(config.seed, 0, range(len(corpus)), CHAT_STREAM) < config.chat_fraction
    out = []
    for (prompt, completion), as_chat in zip(corpus, chat.tolist(), strict=True):
        if as_chat:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        else:
            out.append(list(tokenizer(f"{prompt} {completion}{tokenizer.eos_token}")["input_ids"]))
    return out


def _batch(step: int, config: LLMPretrainConfig) -> list[int]:
    per_epoch = config.n_examples // config.batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(config.n_examples, generator=sample_generator(config.seed, epoch, 0, SHUFFLE_STREAM))
    return perm[pos * config.batch_size : (pos + 1) * config.batch_size].tolist()


def pretrain_lm(
    config: LLMPretrainConfig | None,
    output_dir: str | os.PathLike,
    progress: bool = True,
    *,
    eval_n_per_prompt: int = 8,
) -> Path:
    """Pretrain the toy LM with ``config`` (default :data:`LLM_BASE_CONFIG`) and save model, tokenizer and
    ``pretrain.json`` (config, its hash, time, and with ``eval_n_per_prompt > 0`` the base's gold metrics on
    :func:`~diffalign.toy.llm_world.all_prompts` for sampling seeds 0, 1, 2, plus seed 0 in chat form)."""
    config = config or LLM_BASE_CONFIG
    started = time.time()
    tokenizer = build_toy_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=config.seed)
    data = encode_corpus(config, tokenizer)

    def step_loss(step: int) -> torch.Tensor:
        rows = [data[i] for i in _batch(step, config)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    train_steps(
        [{"params": list(model.parameters())}],
        config,
        step_loss,
        modules=[model],
        desc="toy LM pretrain",
        progress=progress,
        log_every=20,
    )
    info: dict = {"config": asdict(config), "hash": config.hash(), "pretrain_seconds": round(time.time() - started, 1)}
    if eval_n_per_prompt > 0:
        info["eval"] = evaluate_base(model, tokenizer, n_per_prompt=eval_n_per_prompt)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    (output_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return output_dir


def evaluate_base(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, n_per_prompt: int = 8) -> dict:
    """Gold metrics (no samples) on all prompts for each of :data:`EVAL_SEEDS`, and seed 0 in chat form."""
    out: dict = {"n_per_prompt": n_per_prompt, "n_prompts": len(all_prompts())}
    for seed in EVAL_SEEDS:
        metrics = property_rate(model, tokenizer, n_per_prompt=n_per_prompt, seed=seed)
        out[f"seed{seed}"] = {k: round(v, 4) for k, v in metrics.items() if k != "samples"}
    chat = [[{"role": "user", "content": p}] for p in all_prompts()]
    metrics = property_rate(model, tokenizer, chat, n_per_prompt=n_per_prompt, seed=0)
    out["chat_seed0"] = {k: round(v, 4) for k, v in metrics.items() if k != "samples"}
    return out


def read_info(path: str | os.PathLike) -> dict | None:
    """The ``pretrain.json`` of a saved base, or ``None`` if there is none."""
    file = Path(path) / INFO_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def default_llm_base_path() -> Path:
    """The committed pretrained toy LM, ``diffalign/toy/weights/llm_base``."""
    return Path(__file__).resolve().parent / "weights" / "llm_base"


def _matches(path: Path, digest: str) -> bool:
    info = read_info(path)
    return info is not None and info.get("hash") == digest and (path / "model.safetensors").is_file()


def ensure_llm_base(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of a usable toy LM base: the committed one if its config hash matches :data:`LLM_BASE_CONFIG`'s, else a
    cached or freshly pretrained one in ``cache_dir`` (default ``~/.cache/diffalign/toy``) under
    ``llm-base-<hash>``, written into a temporary folder renamed into place. Never downloads."""
    digest = LLM_BASE_CONFIG.hash()
    return ensure_pretrained(
        default_llm_base_path(),
        f"llm-base-{digest}",
        lambda folder: pretrain_lm(LLM_BASE_CONFIG, folder, progress=progress),
        cache_dir,
        usable=lambda folder: _matches(folder, digest),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the toy LM base (diffalign.toy, word-level Llama).")
    parser.add_argument("--output-dir", required=True)
    for name, value in asdict(LLM_BASE_CONFIG).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--eval-n-per-prompt", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    output_dir, eval_n = args.pop("output_dir"), args.pop("eval_n_per_prompt")
    torch.set_num_threads(args.pop("threads"))
    progress = not args.pop("no_progress")
    path = pretrain_lm(LLMPretrainConfig(**args), output_dir, progress=progress, eval_n_per_prompt=eval_n)
    print(json.dumps(read_info(path), indent=2))


if __name__ == "__main__":
    main()
