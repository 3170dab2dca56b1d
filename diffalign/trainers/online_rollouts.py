"""What group RL on a diffusion model shares, whatever its loss (Flow-GRPO / GRPO-Guard, DiffusionNFT): rollout
epochs of ``online.prompts_per_rollout`` prompts × ``num_generations`` images split over the processes, the rewards
(one weighted sum, or one column per reward when MARBLE balances them or their gradients are logged), and a stream
of training units (micro-batch, trained step) addressed by the run's micro-batch index, so a run resumed at a rollout
boundary continues exactly.

Subclasses define :meth:`make_buffer` (one rollout epoch → the units it trains) and :meth:`compute_loss`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import Config
from diffalign.data.prompts import load_prompts
from diffalign.eval.diversity import embedding_spread, pvs_per_prompt
from diffalign.models.rollout import SamplerSettings, Trajectory, build_schedule, conditioning, rollout
from diffalign.rewards.base import EmbeddingReward
from diffalign.rewards.combine import WeightedSum
from diffalign.rewards.from_config import build_online_reward
from diffalign.trainers.base import Trainer
from diffalign.trainers.diffusion_policy import DiffusionPolicyMixin
from diffalign.trainers.reward_balance import RewardBalance
from diffalign.utils.randomness import sample_key

ROLLOUT_STREAM, PROMPT_STREAM, ORDER_STREAM, WINDOW_STREAM = 31, 32, 33, 34


@dataclass(frozen=True)
class RolloutLayout:
    """How one rollout epoch splits over the processes: ``group_size`` images per prompt, ``local_samples`` images
    per process, sampled ``sample_batch_size`` at a time and trained in ``micro_per_pass`` micro-batches per inner
    epoch; ``steps_per_rollout`` optimizer steps per epoch (checkpoints and toy-evidence segments end on a multiple).
    """

    group_size: int
    local_samples: int
    sample_batch_size: int
    micro_per_pass: int
    steps_per_rollout: int


@dataclass
class Scores:
    """One rollout epoch's rewards over all processes: ``total`` (N,) the weighted sum; ``per_reward`` (N, K) each
    reward's raw score (``None`` unless rewards are balanced or their gradients logged); ``names`` their names."""

    total: torch.Tensor
    per_reward: torch.Tensor | None
    names: list[str]


class OnlineRolloutTrainer(DiffusionPolicyMixin, Trainer):
    """Rollout epochs, rewards and the unit stream of online group RL on diffusion models."""

    #: training units of one optimizer step per micro-batch (the trained sampler steps); set by subclasses
    def units_per_micro_batch(self) -> int:
        raise NotImplementedError

    def micro_batches_per_step(self) -> int:
        return self.config.train.gradient_accumulation_steps * self.units_per_micro_batch()

    def build_rollouts(self) -> None:
        """Sampler, schedule, reward, prompts and the per-process counts (after :meth:`build_policy`)."""
        oc, dc = self.config.online, self.config.data
        acc = self.accelerator
        self.settings = SamplerSettings(
            kind=oc.sampler,
            steps=oc.sample_steps,
            guidance_scale=oc.guidance_scale,
            noise_level=oc.noise_level,
            resolution=dc.resolution,
        )
        self.schedule = build_schedule(self.adapter, self.settings, oc.sigma_schedule)
        self.reward = build_online_reward(oc, acc.device)
        self.prompts = load_prompts(dc.path, split=dc.split, max_samples=dc.max_samples)
        self.dataset, self.collate = self.prompts, None
        layout = self.rollout_layout(self.config, acc.num_processes)
        self.group_size, self.local_samples = layout.group_size, layout.local_samples
        self.sample_batch_size, self.micro_per_pass = layout.sample_batch_size, layout.micro_per_pass
        self.steps_per_rollout = layout.steps_per_rollout
        guided = self.settings.guidance_scale != 1.0
        self.uncond = conditioning(self.adapter, [""], dc.resolution) if guided else None  # one row, broadcast
        self.balance = self._reward_balance()

    @classmethod
    def images_per_group(cls, config: Config) -> int:
        """Images sampled per prompt of a rollout epoch."""
        return config.online.num_generations

    @classmethod
    def rollout_layout(cls, config: Config, num_processes: int = 1) -> RolloutLayout:
        """How one rollout epoch of ``config`` splits over ``num_processes``; a one-line error when it cannot."""
        oc, tc = config.online, config.train
        group_size = cls.images_per_group(config)
        total = oc.prompts_per_rollout * group_size
        if total % num_processes:
            raise ValueError(
                f"online.prompts_per_rollout x group size = {total} images per rollout do not split over "
                f"{num_processes} processes; choose counts whose product is a multiple of the process count"
            )
        local = total // num_processes
        sample_bs = oc.sample_batch_size or tc.train_batch_size
        if local % tc.train_batch_size or local % sample_bs:
            raise ValueError(
                f"{local} images per process per rollout must be a multiple of train.train_batch_size "
                f"({tc.train_batch_size}) and of online.sample_batch_size ({sample_bs})"
            )
        micro_per_pass = local // tc.train_batch_size
        micro_total = micro_per_pass * oc.inner_epochs
        if micro_total % tc.gradient_accumulation_steps:
            raise ValueError(
                f"{micro_total} micro-batches per rollout ({micro_per_pass} x online.inner_epochs) are not a "
                f"multiple of train.gradient_accumulation_steps={tc.gradient_accumulation_steps}"
            )
        steps = micro_total // tc.gradient_accumulation_steps
        if tc.checkpointing_steps % steps:
            raise ValueError(
                f"train.checkpointing_steps={tc.checkpointing_steps} must be a multiple of the {steps} optimizer "
                "steps of one rollout epoch (a checkpoint inside an epoch could not resume exactly)"
            )
        return RolloutLayout(group_size, local, sample_bs, micro_per_pass, steps)

    def _reward_balance(self) -> RewardBalance | None:
        oc = self.config.online
        if oc.reward_balance != "marble" and oc.reward_gradient_log_every == 0:
            return None
        if not isinstance(self.reward, WeightedSum):
            raise ValueError(
                "online.reward_gradient_log_every compares the gradients of several rewards; list two or more "
                "online.reward_functions (or set it to 0)"
            )
        if self.fsdp2 is not None:
            raise ValueError(
                "online.reward_balance marble / reward_gradient_log_every: per-reward gradients under FSDP2 are not "
                "supported yet; launch with DDP (the trained LoRA parameters are small)"
            )
        return RewardBalance(
            self.reward.names,
            self.trainable_parameters,
            self.accelerator,
            marble=oc.reward_balance == "marble",
            rho=oc.marble_rho,
            floor=oc.marble_floor,
        )

    def extra_state(self) -> dict[str, Any]:
        return {"reward_balance": self.balance.state_dict()} if self.balance is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.balance is not None and "reward_balance" in state:
            self.balance.load_state_dict(state["reward_balance"])

    # -- one rollout epoch ---------------------------------------------------------------------------------------
    def group_prompts(self, r: int) -> list[str]:
        gen = torch.Generator().manual_seed(sample_key(self.config.train.seed, r, 0, PROMPT_STREAM))
        order = torch.randperm(len(self.prompts), generator=gen).tolist()
        groups = self.config.online.prompts_per_rollout
        return [self.prompts[order[g % len(order)]] for g in range(groups)]

    def local_ids(self) -> list[int]:
        """The global sample indices this process samples in every rollout epoch."""
        first = self.accelerator.process_index * self.local_samples
        return list(range(first, first + self.local_samples))

    @torch.no_grad()
    def sample(
        self, r: int, *, window: tuple[int, int] | None = None, keep_means: bool = False
    ) -> tuple[list[str], list[Trajectory], torch.Tensor]:
        """This process's rollouts of epoch ``r``: (prompts, trajectory batches, images in [0, 1])."""
        oc, k = self.config.online, self.group_size
        group_prompts = self.group_prompts(r)
        ids = self.local_ids()
        prompts = [group_prompts[i // k] for i in ids]
        seed = sample_key(self.config.train.seed, r, 0, ROLLOUT_STREAM)
        parts = []
        for s in range(0, len(ids), self.sample_batch_size):
            batch_ids = ids[s : s + self.sample_batch_size]
            parts.append(
                rollout(
                    self.adapter,
                    prompts[s : s + self.sample_batch_size],
                    self.settings,
                    seed=seed,
                    indices=batch_ids,
                    noise_indices=[i // k for i in batch_ids] if oc.same_initial_noise else None,
                    window=window,
                    keep_means=keep_means,
                    schedule=self.schedule,
                )
            )
        return prompts, parts, torch.cat([t.images for t in parts])

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> Scores:
        """The rewards of this process's images, gathered over all processes (in global sample order)."""
        acc = self.accelerator
        if self.balance is None:
            total = self.reward(images, prompts).float().reshape(-1)
            return Scores(acc.gather(total.to(acc.device)).cpu(), None, [])
        columns = self.reward.per_reward(images, prompts)
        per_reward = torch.stack([columns[n].float().reshape(-1) for n in self.reward.names], dim=1)
        total = self.reward.combine(columns).float().reshape(-1)
        gathered = acc.gather(torch.cat([total[:, None], per_reward], dim=1).to(acc.device)).cpu()
        return Scores(gathered[:, 0], gathered[:, 1:], list(self.reward.names))

    def rollout_metrics(self, images: torch.Tensor, prompts: list[str], scores: Scores) -> dict[str, torch.Tensor]:
        gathered = scores.total
        groups = gathered.view(-1, self.group_size)
        m = {
            "reward/mean": gathered.nanmean(),
            "reward/std": gathered.std(unbiased=False),
            "reward/group_std": groups.std(dim=1, unbiased=False).mean(),
            "zero_std_ratio": (groups.std(dim=1, unbiased=False) < 1e-6).float().mean(),
            "diversity/pvs": torch.tensor(pvs_per_prompt(images, prompts)),
        }
        if scores.per_reward is not None:
            for k, name in enumerate(scores.names):
                m[f"reward/{name}"] = scores.per_reward[:, k].nanmean()
        if isinstance(self.reward, EmbeddingReward):
            m["diversity/embedding_spread"] = torch.tensor(
                embedding_spread(self.reward.image_embeds(images.to(self.accelerator.device)).float().cpu(), prompts)
            )
        return {k: torch.as_tensor(v, dtype=torch.float32).reshape(1) for k, v in m.items()}

    # -- the unit stream -----------------------------------------------------------------------------------------
    def make_buffer(self, r: int) -> tuple[Any, list[dict[str, Any]]]:
        """Rollout epoch ``r``: (its buffer, the training units it yields, each a dict the loss reads)."""
        raise NotImplementedError

    def micro_batch_stream(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        per_step = self.micro_batches_per_step()
        units_per_rollout = self.steps_per_rollout * per_step
        r, offset = divmod(start, units_per_rollout)
        if offset:
            raise ValueError(
                f"resuming at micro-batch {start}, inside rollout epoch {r}: a checkpoint must fall on a rollout "
                f"boundary (every {self.steps_per_rollout} optimizer steps)"
            )
        while True:
            buffer, units = self.make_buffer(r)
            if len(units) != units_per_rollout:
                raise RuntimeError(f"rollout {r}: {len(units)} training units, expected {units_per_rollout}")
            for n, unit in enumerate(units):
                opt_step, within = divmod(r * units_per_rollout + n, per_step)
                yield r, {**unit, "buffer": buffer, "first": n == 0, "opt_step": opt_step, "step_first": within == 0}
            r += 1

    def solves_balance(self, batch: dict[str, Any]) -> bool:
        """Whether this unit computes per-reward gradients: MARBLE's full step (grpo always; nft every
        ``online.marble_every`` optimizer steps), or the weighted sum's logged diagnostics (first unit of every
        ``online.reward_gradient_log_every``-th step)."""
        oc = self.config.online
        if self.balance is None:
            return False
        if self.balance.marble:
            return self.balance_every() == 1 or batch["opt_step"] % self.balance_every() == 0
        return batch["step_first"] and batch["opt_step"] % oc.reward_gradient_log_every == 0

    def balance_every(self) -> int:
        """Optimizer steps between MARBLE's solves (1: every step, the non-amortised form)."""
        return 1
