"""Group RL for diffusion models: Flow-GRPO (and DDPO / DanceGRPO samplers) with GRPO-Guard's regulated clipping.

One rollout epoch: ``online.prompts_per_rollout`` prompts × ``num_generations`` images sampled with log-probs
(:func:`diffalign.models.rollout.rollout`), scored by the reward, turned into advantages over the gathered epoch
(:func:`diffalign.losses.advantages.compute_advantages`), zero-advantage samples dropped; then ``inner_epochs``
passes over the kept samples in ``train_batch_size`` micro-batches, each micro-batch trained at every trained sampler
step ``j`` (Flow-GRPO: the first ``int(steps · timestep_fraction)`` steps in order, or the SDE window of
Flow-GRPO-Fast). One backward per (micro-batch, step); an optimizer step after ``gradient_accumulation_steps``
micro-batches × all trained steps, so the gradient is the mean over both, as in ``scripts/train_sd3.py``.

Per (micro-batch, step) the loss is the ``online.policy_loss`` registered in
:data:`~diffalign.losses.policy_registry.POLICY_LOSSES`: ``flow_grpo``
(:func:`~diffalign.losses.policy.flow_grpo_policy_loss`, PPO clip on the ratio of the step's mean-over-latent
log-probs) or ``grpo_guard`` (:func:`~diffalign.losses.policy.grpo_guard_policy_loss`, RatioNorm with the means stored
at sampling time, gradient reweighted by 1/|Δσ|), plus ``β ·`` the code-form KL
:func:`~diffalign.losses.policy.flow_grpo_kl` to the reference network (``self.reference``: LoRA adapters disabled,
or a frozen or offloaded copy; ``train.reference=precomputed`` is refused, no pass can store values of fresh rollouts).
Rollouts are addressed by (seed, rollout epoch, sample), so a run resumed from a checkpoint at a rollout boundary
continues exactly (checkpoints must fall on one).

Several rewards: ``online.reward_balance: marble`` gives each reward its own advantage (a NaN reward counts as its
group's mean: advantage 0) and balances the per-reward policy gradients with MARBLE's min-norm program at every
micro-batch (:mod:`diffalign.trainers.reward_balance`; the clipped loss is not affine in the advantage, so there is
no amortised form here: ``K + 1`` backward passes per unit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import Config
from diffalign.losses.advantages import compute_advantages, samples_per_prompt
from diffalign.losses.policy import flow_grpo_kl
from diffalign.losses.policy_registry import PolicyStep, get_policy_loss
from diffalign.models.rollout import step_log_prob
from diffalign.trainers.online_rollouts import ORDER_STREAM, WINDOW_STREAM, OnlineRolloutTrainer, Scores
from diffalign.utils.randomness import sample_key

logger = logging.getLogger(__name__)


def trained_step_count(config: Config) -> int:
    oc = config.online
    return oc.sde_window_size if oc.sde_window_size > 0 else int(oc.sample_steps * oc.timestep_fraction)


@dataclass
class RolloutBuffer:
    """This process's share of one rollout epoch (rows = local samples)."""

    prompts: list[str]
    latents: torch.Tensor  # (n, S + 1, ...)
    log_probs: torch.Tensor  # (n, S)
    means: torch.Tensor | None  # (n, S, ...) for GRPO-Guard
    cond: dict[str, torch.Tensor]
    advantages: torch.Tensor  # (n,)
    trained_steps: list[int]
    micro_batches: list[list[list[int]]]  # [inner epoch][micro-batch] -> rows
    metrics: dict[str, torch.Tensor]
    reward_advantages: torch.Tensor | None = None  # (n, K): one advantage per reward (MARBLE, diagnostics)


def _fill_missing(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """NaN scores (a reward that does not apply to a sample) replaced by the mean of their group's finite ones (0
    when none is)."""
    groups = rewards.reshape(-1, group_size)
    finite = torch.isfinite(groups)
    counts = finite.sum(dim=1, keepdim=True)
    means = torch.where(finite, groups, 0.0).sum(dim=1, keepdim=True) / counts.clamp_min(1)
    return torch.where(finite, groups, means.expand_as(groups)).reshape(-1)


class DiffusionGRPOTrainer(OnlineRolloutTrainer):
    def units_per_micro_batch(self) -> int:
        return trained_step_count(self.config)

    @classmethod
    def images_per_group(cls, config: Config) -> int:
        return samples_per_prompt(config.online.advantage, config.online.num_generations)

    def build(self) -> None:
        self.build_policy(needs_reference=self.config.online.beta > 0, stored_reference=False)
        self.build_rollouts()

    # -- rollouts ---------------------------------------------------------------------------------------------
    def _window(self, r: int) -> tuple[int, int] | None:
        oc = self.config.online
        if oc.sde_window_size == 0:
            return None
        lo, hi = oc.sde_window_range or [0, max(oc.sample_steps // 2, oc.sde_window_size)]
        span = max(hi - oc.sde_window_size - lo + 1, 1)
        gen = torch.Generator().manual_seed(sample_key(self.config.train.seed, r, 0, WINDOW_STREAM))
        start = lo + int(torch.randint(span, (), generator=gen))
        return start, start + oc.sde_window_size

    def _advantages(self, scores: Scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(advantages (N,), keep (N,), per-reward advantages (N, K) or None) over the gathered epoch. Under MARBLE
        ``advantages`` is each sample's largest ``|A_k|``: what decides whether it is dropped, and what is logged."""
        oc, k = self.config.online, self.group_size
        if scores.per_reward is None or oc.reward_balance != "marble":
            advantages, keep = compute_advantages(scores.total, oc.advantage, k)
        columns = None
        if scores.per_reward is not None:
            per = [compute_advantages(_fill_missing(c, k), oc.advantage, k) for c in scores.per_reward.T]
            columns = torch.stack([a for a, _ in per], dim=1)
            if oc.reward_balance == "marble":
                keep = per[0][1]
                advantages = columns.abs().amax(dim=1)
        return advantages, keep, columns

    @torch.no_grad()
    def _rollout_epoch(self, r: int) -> RolloutBuffer:
        oc = self.config.online
        window = self._window(r)
        keep_means = get_policy_loss(oc.policy_loss).needs_means
        prompts, parts, images = self.sample(r, window=window, keep_means=keep_means)
        scores = self.score(images, prompts)
        advantages, keep, columns = self._advantages(scores)
        local = slice(self.local_ids()[0], self.local_ids()[0] + self.local_samples)
        advantages, keep = advantages[local], keep[local]

        stochastic = parts[0].stochastic
        steps = [j for j in range(self.settings.steps) if stochastic[j]]
        trained = steps[: trained_step_count(self.config)] if window is None else steps
        rows = self._kept_rows(advantages, keep, r)
        order_gen = torch.Generator().manual_seed(sample_key(self.config.train.seed, r, 0, ORDER_STREAM))
        micro = []
        for _ in range(oc.inner_epochs):
            shuffled = [rows[i] for i in torch.randperm(len(rows), generator=order_gen).tolist()]
            micro.append([shuffled[m :: self.micro_per_pass] for m in range(self.micro_per_pass)])
        cond = {key: torch.cat([t.cond[key] for t in parts]) for key in parts[0].cond}
        metrics = self.rollout_metrics(images, prompts, scores)
        metrics["advantage/abs_mean"] = advantages[keep].abs().mean().reshape(1)
        metrics["kept_fraction"] = torch.tensor([len(rows) / max(len(advantages), 1)])
        device = self.accelerator.device
        return RolloutBuffer(
            prompts=prompts,
            latents=torch.cat([t.latents for t in parts]),
            log_probs=torch.cat([t.log_probs for t in parts]),
            means=torch.cat([t.means for t in parts]) if keep_means else None,
            cond=cond,
            advantages=advantages.to(device),
            trained_steps=trained,
            micro_batches=micro,
            metrics=metrics,
            reward_advantages=columns[local].to(device) if columns is not None else None,
        )

    def _kept_rows(self, advantages: torch.Tensor, keep: torch.Tensor, r: int) -> list[int]:
        """Rows that train: MC-GRPO's pivots never; zero-advantage rows dropped (``drop_zero_advantage``), then
        dropped rows re-added at random until the count is a positive multiple of the micro-batch count."""
        candidates = keep.nonzero().squeeze(1).tolist()
        if not self.config.online.drop_zero_advantage:
            return candidates
        kept = [i for i in candidates if advantages[i] != 0]
        dropped = [i for i in candidates if advantages[i] == 0]
        gen = torch.Generator().manual_seed(sample_key(self.config.train.seed, r, 1, ORDER_STREAM))
        dropped = [dropped[i] for i in torch.randperm(len(dropped), generator=gen).tolist()]
        n = self.micro_per_pass
        while dropped and (len(kept) < n or len(kept) % n):
            kept.append(dropped.pop())
        return sorted(kept)

    def make_buffer(self, r: int) -> tuple[RolloutBuffer, list[dict[str, Any]]]:
        buffer = self._rollout_epoch(r)
        units = [
            {"rows": rows, "step": j} for epoch in buffer.micro_batches for rows in epoch for j in buffer.trained_steps
        ]
        return buffer, units

    # -- one (micro-batch, sampler step) ----------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        oc = self.config.online
        buffer: RolloutBuffer = batch["buffer"]
        rows, j = torch.tensor(batch["rows"]), batch["step"]
        device = self.accelerator.device
        x, x_next = buffer.latents[rows, j].to(device), buffer.latents[rows, j + 1].to(device)
        cond = {k: v[rows.to(v.device)] for k, v in buffer.cond.items()}
        uncond = self.uncond
        step = step_log_prob(self.adapter, self.settings, self.schedule, j, x, x_next, cond, uncond)
        old = buffer.log_probs[rows, j].to(device)
        advantages = buffer.advantages[rows.to(device)]
        policy_loss = get_policy_loss(oc.policy_loss)
        old_means = buffer.means[rows, j].to(device) if buffer.means is not None else None

        def loss_with(adv: torch.Tensor):
            inputs = PolicyStep(step.log_prob, old, adv, step.mean, old_means, step.std_dev_t, step.sqrt_dt)
            return policy_loss(inputs, clip_range=oc.clip_range, adv_clip_max=oc.adv_clip_max)

        per_reward = None
        if buffer.reward_advantages is not None:
            columns = buffer.reward_advantages[rows.to(device)]
            per_reward = [loss_with(columns[:, k]) for k in range(columns.shape[1])]
        if self.balance is not None and self.balance.marble:
            out = per_reward[0]  # logged ratio statistics: the same ratio under every reward's advantages
            loss, balance_metrics = self.balance.balanced_loss([o.loss for o in per_reward])
        else:
            out = loss_with(advantages)
            loss, balance_metrics = out.loss, {}
            if per_reward is not None and self.solves_balance(batch):
                balance_metrics = self.balance.diagnose([o.loss for o in per_reward], out.loss)
        metrics = {name: value.detach().reshape(1) for name, value in out.metrics.items()}
        metrics.update(balance_metrics)
        metrics[f"ratio_mean/step_{j}"] = out.metrics["ratio/mean"].detach().reshape(1)
        metrics[f"ratio_std/step_{j}"] = out.metrics["ratio/std"].detach().reshape(1)
        if oc.beta > 0:
            with self.reference.network() as reference, torch.no_grad():
                ref = step_log_prob(
                    self.adapter.with_denoiser(reference), self.settings, self.schedule, j, x, x_next, cond, uncond
                )
            kl = flow_grpo_kl(step.mean, ref.mean, step.std_dev_t)
            loss = loss + oc.beta * kl
            metrics["kl"] = kl.detach().reshape(1)
        if batch["first"]:
            metrics.update(buffer.metrics)
        return loss, metrics
