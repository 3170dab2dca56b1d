"""Online GRPO for causal LMs (``train.method: grpo``) on the shared trainer base.

Each micro-batch of prompts (``prompt`` column; every other column is passed to the reward functions, as TRL does):

1. sample ``online.num_generations`` completions per prompt (MC-GRPO: one more, its pivot) with ``generate`` under a
   seed derived from (``train.seed``, epoch, the batch's first example), so runs on 1 or N processes and resumed runs
   draw the same completions;
2. score them: ``R = Σ_k w_k r_k`` over ``online.reward_functions`` (TRL's signature ``fn(prompts=..., completions=...,
   **columns) -> list[float]``; ``None`` = unscorable, advantage 0);
3. advantages over the gathered batch (:func:`diffalign.losses.advantages.compute_advantages`: group / batch / none
   scaling, RLOO, MC-GRPO, BNPO, best-of-K);
4. one forward of prompt+completion with gradient, token log-probs at the sampling temperature, and the clipped
   objective :func:`diffalign.losses.policy.clipped_policy_loss` (TRL aggregations, token or sequence ratios, k3 KL to
   the reference, ``self.reference``, when ``online.beta > 0``).

Policy updates are on-policy (TRL's ``num_iterations = 1``): the ratio is 1 in value and the loss is the policy
gradient; several optimizer passes over one rollout batch are not offered. Logged with TRL's names: ``reward``,
``reward_std``, ``rewards/<function>/mean``, ``frac_reward_zero_std``, ``completions/mean_length``,
``clip_ratio/*``, ``kl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffalign.data.llm import load_text_rows
from diffalign.data.prompts import PromptDataset, collate_prompts
from diffalign.losses.advantages import compute_advantages, samples_per_prompt
from diffalign.losses.policy import clipped_policy_loss
from diffalign.models.causal_lm import (
    collate_completions,
    completion_token_stats,
    prompt_ids,
    sample_completion_ids,
)
from diffalign.models.reference import unwrap
from diffalign.trainers.llm_policy import CausalLMTrainer
from diffalign.utils.imports import load_callable
from diffalign.utils.randomness import sample_key

ROLLOUT_STREAM = 23
RewardFn = Callable[..., Sequence[float | None]]


def load_reward_function(spec: str) -> RewardFn:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` → the function."""
    return load_callable(spec)


def reward_name(spec: str) -> str:
    return spec.rpartition(":")[2]


class LLMGRPOTrainer(CausalLMTrainer):
    def build(self) -> None:
        oc, dc = self.config.online, self.config.data
        self.build_policy(needs_reference=oc.beta > 0, stored_reference=False)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token: GRPO needs one to end completions")
        self.reward_fns = [load_reward_function(spec) for spec in oc.reward_functions]
        self.reward_names = [reward_name(spec) for spec in oc.reward_functions]
        self.reward_weights = torch.tensor(oc.reward_weights or [1.0] * len(self.reward_fns), dtype=torch.float32)
        self.group_size = samples_per_prompt(oc.advantage, oc.num_generations)
        rows = load_text_rows(dc.path, "prompts", split=dc.split, on_bad_row=dc.on_bad_row, max_samples=dc.max_samples)
        self.dataset = PromptDataset(rows)
        self.collate = collate_prompts

    # -- rollouts -----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Any], seed: int) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, completion ids) of ``group_size`` samples per prompt (contiguous per prompt); each completion
        ends at its first EOS (kept) or after ``max_new_tokens``."""
        oc = self.config.online
        prompts_ids = [prompt_ids(self.tokenizer, p) for p in prompts for _ in range(self.group_size)]
        completions = sample_completion_ids(
            unwrap(self.model),
            prompts_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            seed=seed,
            max_new_tokens=oc.max_new_tokens,
            temperature=oc.temperature,
            top_p=oc.top_p,
            top_k=oc.top_k,
        )
        return prompts_ids, completions

    def score(self, rows: Sequence[dict[str, Any]], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted total (N,), per-function rewards (N, K)); ``None`` from a function becomes NaN."""
        expanded = [row for row in rows for _ in range(self.group_size)]
        columns = {k: [row[k] for row in expanded] for k in expanded[0] if k not in ("prompt", "index")}
        prompts = [row["prompt"] for row in expanded]
        per_fn = []
        for name, fn in zip(self.reward_names, self.reward_fns, strict=True):
            values = list(fn(prompts=prompts, completions=texts, **columns))
            if len(values) != len(texts):
                raise ValueError(f"reward function '{name}' returned {len(values)} values for {len(texts)} completions")
            per_fn.append([math.nan if v is None else float(v) for v in values])
        rewards = torch.tensor(per_fn, dtype=torch.float32).T
        total = (rewards * self.reward_weights).nansum(dim=1)
        total[rewards.isnan().all(dim=1)] = math.nan
        return total, rewards

    # -- one micro-batch ----------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        oc, acc, device = self.config.online, self.accelerator, self.accelerator.device
        rows = batch["rows"]
        seed = sample_key(self.config.train.seed, epoch, int(batch["index"][0]), ROLLOUT_STREAM)
        prompts_ids, completion_ids = self.generate([r["prompt"] for r in rows], seed)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards, per_fn = self.score(rows, texts)

        local = rewards.numel()
        gathered = acc.gather(rewards.to(device)).cpu()
        advantages, keep = compute_advantages(gathered, oc.advantage, self.group_size)
        start = acc.process_index * local
        advantages, keep = advantages[start : start + local], keep[start : start + local]

        sequences = collate_completions(
            [{"prompt_ids": p, "completion_ids": [c]} for p, c in zip(prompts_ids, completion_ids, strict=True)],
            pad_token_id=self.tokenizer.pad_token_id,
        )
        ids, attention, completion = (sequences[k] for k in ("input_ids", "attention_mask", "completion_mask"))
        kept = keep.nonzero().squeeze(1)
        ids, attention, completion = ids[kept].to(device), attention[kept].to(device), completion[kept].to(device)
        options = {"temperature": oc.temperature, "with_details": False}
        stats = completion_token_stats(self.model, ids, attention, completion, **options)
        ref_logps = None
        if self.reference is not None:
            ref_logps = self.reference.logps(
                batch, epoch, lambda module: completion_token_stats(module, ids, attention, completion, **options).logps
            )
        out = clipped_policy_loss(
            stats.logps,
            None,
            advantages[kept].to(device),
            stats.mask,
            epsilon_low=oc.epsilon,
            epsilon_high=oc.epsilon_high,
            aggregation=oc.loss_type,
            importance_sampling_level=oc.importance_sampling_level,
            max_completion_length=oc.max_new_tokens,
            beta=oc.beta,
            ref_logps=ref_logps,
            gradient_accumulation_steps=1,  # accelerate's backward divides by the accumulation steps
        )
        return out.loss, self._metrics(rewards, per_fn, completion_ids, out.metrics)

    def _metrics(
        self, rewards: torch.Tensor, per_fn: torch.Tensor, completion_ids: list[list[int]], loss_metrics: dict
    ) -> dict[str, torch.Tensor]:
        groups = rewards.view(-1, self.group_size)
        m = {
            "reward": rewards,
            "reward_std": groups.std(dim=1),
            "frac_reward_zero_std": (groups.std(dim=1) < 1e-6).float(),
            "completions/mean_length": torch.tensor([float(len(c)) for c in completion_ids]),
        }
        for k, name in enumerate(self.reward_names):
            m[f"rewards/{name}/mean"] = per_fn[:, k]
        for name, value in loss_metrics.items():
            m[name] = torch.as_tensor(value).detach().reshape(-1)
        return m
