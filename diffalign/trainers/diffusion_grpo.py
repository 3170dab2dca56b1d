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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import Config
from diffalign.data.prompts import load_prompts
from diffalign.eval.diversity import embedding_spread, pvs_per_prompt
from diffalign.losses.advantages import compute_advantages, samples_per_prompt
from diffalign.losses.policy import flow_grpo_kl
from diffalign.losses.policy_registry import PolicyStep, get_policy_loss
from diffalign.models.rollout import SamplerSettings, build_schedule, conditioning, rollout, step_log_prob
from diffalign.rewards.base import EmbeddingReward
from diffalign.rewards.from_config import build_online_reward
from diffalign.trainers.base import Trainer
from diffalign.trainers.diffusion_policy import DiffusionPolicyMixin
from diffalign.utils.randomness import sample_key

logger = logging.getLogger(__name__)

ROLLOUT_STREAM, PROMPT_STREAM, ORDER_STREAM, WINDOW_STREAM = 31, 32, 33, 34


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


class DiffusionGRPOTrainer(DiffusionPolicyMixin, Trainer):
    def micro_batches_per_step(self) -> int:
        return self.config.train.gradient_accumulation_steps * trained_step_count(self.config)

    def build(self) -> None:
        oc, dc, tc = self.config.online, self.config.data, self.config.train
        acc = self.accelerator
        adapter = self.build_policy(needs_reference=oc.beta > 0, stored_reference=False)
        self.settings = SamplerSettings(
            kind=oc.sampler,
            steps=oc.sample_steps,
            guidance_scale=oc.guidance_scale,
            noise_level=oc.noise_level,
            resolution=dc.resolution,
        )
        self.schedule = build_schedule(adapter, self.settings, self.config.online.sigma_schedule)
        self.reward = build_online_reward(oc, acc.device)
        self.prompts = load_prompts(dc.path, split=dc.split, max_samples=dc.max_samples)
        self.dataset, self.collate = self.prompts, None
        self.group_size = samples_per_prompt(oc.advantage, oc.num_generations)
        total = oc.prompts_per_rollout * self.group_size
        if total % acc.num_processes:
            raise ValueError(
                f"online.prompts_per_rollout x group size = {total} images per rollout do not split over "
                f"{acc.num_processes} processes; choose counts whose product is a multiple of the process count"
            )
        self.local_samples = total // acc.num_processes
        sample_bs = oc.sample_batch_size or tc.train_batch_size
        if self.local_samples % tc.train_batch_size or self.local_samples % sample_bs:
            raise ValueError(
                f"{self.local_samples} images per process per rollout must be a multiple of train.train_batch_size "
                f"({tc.train_batch_size}) and of online.sample_batch_size ({sample_bs})"
            )
        self.sample_batch_size = sample_bs
        self.micro_per_pass = self.local_samples // tc.train_batch_size
        micro_total = self.micro_per_pass * oc.inner_epochs
        if micro_total % tc.gradient_accumulation_steps:
            raise ValueError(
                f"{micro_total} micro-batches per rollout ({self.micro_per_pass} x online.inner_epochs) are not a "
                f"multiple of train.gradient_accumulation_steps={tc.gradient_accumulation_steps}"
            )
        self.steps_per_rollout = micro_total // tc.gradient_accumulation_steps
        for key in ("checkpointing_steps",):
            if getattr(tc, key) % self.steps_per_rollout:
                raise ValueError(
                    f"train.{key}={getattr(tc, key)} must be a multiple of the {self.steps_per_rollout} optimizer "
                    "steps of one rollout epoch (a checkpoint inside an epoch could not resume exactly)"
                )
        guided = self.settings.guidance_scale != 1.0
        self.uncond = conditioning(adapter, [""], dc.resolution) if guided else None  # one row, broadcast per batch

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

    def _group_prompts(self, r: int) -> list[str]:
        gen = torch.Generator().manual_seed(sample_key(self.config.train.seed, r, 0, PROMPT_STREAM))
        order = torch.randperm(len(self.prompts), generator=gen).tolist()
        groups = self.config.online.prompts_per_rollout
        return [self.prompts[order[g % len(order)]] for g in range(groups)]

    @torch.no_grad()
    def _rollout_epoch(self, r: int) -> RolloutBuffer:
        oc, acc = self.config.online, self.accelerator
        k = self.group_size
        group_prompts = self._group_prompts(r)
        first = acc.process_index * self.local_samples
        ids = list(range(first, first + self.local_samples))
        prompts = [group_prompts[i // k] for i in ids]
        seed = sample_key(self.config.train.seed, r, 0, ROLLOUT_STREAM)
        window = self._window(r)
        keep_means = get_policy_loss(oc.policy_loss).needs_means
        parts, images = [], []
        for s in range(0, len(ids), self.sample_batch_size):
            batch_ids = ids[s : s + self.sample_batch_size]
            noise_ids = [i // k for i in batch_ids] if oc.same_initial_noise else None
            traj = rollout(
                self.adapter,
                prompts[s : s + self.sample_batch_size],
                self.settings,
                seed=seed,
                indices=batch_ids,
                noise_indices=noise_ids,
                window=window,
                keep_means=keep_means,
                schedule=self.schedule,
            )
            parts.append(traj)
            images.append(traj.images)
        images = torch.cat(images)
        rewards = self.reward(images, prompts).float().reshape(-1)
        gathered = acc.gather(rewards.to(acc.device)).cpu()
        advantages, keep = compute_advantages(gathered, oc.advantage, k)
        advantages, keep = advantages[first : first + self.local_samples], keep[first : first + self.local_samples]

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
        metrics = self._rollout_metrics(images, prompts, gathered, advantages, keep, len(rows))
        return RolloutBuffer(
            prompts=prompts,
            latents=torch.cat([t.latents for t in parts]),
            log_probs=torch.cat([t.log_probs for t in parts]),
            means=torch.cat([t.means for t in parts]) if keep_means else None,
            cond=cond,
            advantages=advantages.to(acc.device),
            trained_steps=trained,
            micro_batches=micro,
            metrics=metrics,
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

    def _rollout_metrics(self, images, prompts, gathered, advantages, keep, n_rows) -> dict[str, torch.Tensor]:
        groups = gathered.view(-1, self.group_size)
        m = {
            "reward/mean": gathered.mean(),
            "reward/std": gathered.std(unbiased=False),
            "reward/group_std": groups.std(dim=1, unbiased=False).mean(),
            "zero_std_ratio": (groups.std(dim=1, unbiased=False) < 1e-6).float().mean(),
            "advantage/abs_mean": advantages[keep].abs().mean(),
            "kept_fraction": torch.tensor(n_rows / max(len(advantages), 1)),
            "diversity/pvs": torch.tensor(pvs_per_prompt(images, prompts)),
        }
        if isinstance(self.reward, EmbeddingReward):
            m["diversity/embedding_spread"] = torch.tensor(
                embedding_spread(self.reward.image_embeds(images.to(self.accelerator.device)).float().cpu(), prompts)
            )
        return {k: torch.as_tensor(v, dtype=torch.float32).reshape(1) for k, v in m.items()}

    def micro_batch_stream(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        units_per_rollout = self.steps_per_rollout * self.micro_batches_per_step()
        r, offset = divmod(start, units_per_rollout)
        if offset:
            raise ValueError(
                f"resuming at micro-batch {start}, inside rollout epoch {r}: a checkpoint must fall on a rollout "
                f"boundary (every {self.steps_per_rollout} optimizer steps)"
            )
        while True:
            buffer = self._rollout_epoch(r)
            units = [(rows, j) for epoch in buffer.micro_batches for rows in epoch for j in buffer.trained_steps]
            if len(units) != units_per_rollout:
                raise RuntimeError(f"rollout {r}: {len(units)} training units, expected {units_per_rollout}")
            for n, (rows, j) in enumerate(units):
                yield r, {"buffer": buffer, "rows": rows, "step": j, "first": n == 0}
            r += 1

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
        inputs = PolicyStep(step.log_prob, old, advantages, step.mean, old_means, step.std_dev_t, step.sqrt_dt)
        out = policy_loss(inputs, clip_range=oc.clip_range, adv_clip_max=oc.adv_clip_max)
        loss = out.loss
        metrics = {name: value.detach().reshape(1) for name, value in out.metrics.items()}
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
