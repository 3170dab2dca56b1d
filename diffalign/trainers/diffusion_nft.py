"""DiffusionNFT (arXiv 2509.16117; official code NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``): online RL on the
forward process.

One rollout epoch: the *old* policy (:mod:`diffalign.trainers.old_policy`) samples ``online.prompts_per_rollout`` ×
``num_generations`` images with any sampler (default ``ode``: no log-probabilities, no SDE; default no CFG); only the
clean latents ``x0`` are kept. Rewards become per-prompt advantages (mean over the prompt's images, std over the
gathered epoch; :func:`~diffalign.losses.nft.nft_advantages`) and optimality probabilities ``r``. Then, for
``inner_epochs`` passes over shuffled micro-batches, each sample is trained at ``int(S · timestep_fraction)`` of the
sampler's ``S`` timesteps, in a random order per sample (the code's ``perms_time``): fresh noise ``ε``,
``x_t = add_noise(x0, ε, t)``, and the negative-aware loss :func:`~diffalign.losses.nft.nft_loss` between the policy's
prediction, the old policy's and (``nft.kl_beta > 0``) the frozen base's. After the epoch's optimizer steps the old
policy moves toward the policy, ``θ_old ← d·θ_old + (1 − d)·θ`` with ``d = old_policy_decay(step)``.

SD / SDXL (ε- or v-prediction): the implicit policies are affine mixtures of predictions and the clean estimate is
affine in the prediction, so the same loss holds in x0 space with ``σ`` replaced by the backbone's
``x0_error_scale(t)`` (``x̂0 − x0 = c_t·(target − prediction)``); this is our extension — the paper derives the
method for flow (velocity) models, and its adaptive weighting then favours the noisy end more than on a flow model.

Several rewards: ``online.reward_balance: marble`` keeps one advantage per reward; every ``online.marble_every``
optimizer steps MARBLE's min-norm program is solved on the per-reward gradients (``K + 1`` backward passes), and the
other steps train on the blended advantage ``Σ_k α_k A_k`` with the smoothed coefficients (one backward), the
amortised form the loss's affinity in ``r`` allows (:mod:`diffalign.trainers.reward_balance`).

Rollouts and training noise are addressed by (seed, rollout epoch, sample), and the old policy and MARBLE's
coefficients are in every checkpoint, so a run resumed at a rollout boundary continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffalign.losses.marble import per_reward_advantages
from diffalign.losses.nft import nft_advantages, nft_loss, old_policy_decay, probability_from_advantage
from diffalign.models.diffusion import unwrap
from diffalign.models.rollout import guided_prediction
from diffalign.trainers.old_policy import OldPolicy
from diffalign.trainers.online_rollouts import ORDER_STREAM, OnlineRolloutTrainer
from diffalign.utils.randomness import per_sample_normal, sample_key

TRAIN_NOISE_STREAM = 35
OLD_POLICY_FILE = "old_policy.safetensors"


@dataclass
class NFTBuffer:
    """This process's share of one rollout epoch (rows = local samples)."""

    rollout: int
    ids: list[int]  # global sample index of each row
    clean: torch.Tensor  # (n, C, H, W) the sampled x0
    cond: dict[str, torch.Tensor]
    advantages: torch.Tensor  # (n,) of the weighted-sum reward
    reward_advantages: torch.Tensor | None  # (n, K) one per reward (MARBLE, diagnostics)
    timestep_order: list[torch.Tensor]  # per inner epoch, (n, S): the sampler-step order of each row
    metrics: dict[str, torch.Tensor]


class DiffusionNFTTrainer(OnlineRolloutTrainer):
    def units_per_micro_batch(self) -> int:
        oc = self.config.online
        return int(oc.sample_steps * oc.timestep_fraction)

    def build(self) -> None:
        if self.fsdp2 is not None:
            raise ValueError(
                "train.method nft: the old policy is a copy of the trained parameters swapped into the model, which "
                "FSDP2's sharded parameters do not allow yet; launch with DDP"
            )
        self.build_policy(needs_reference=self.config.nft.kl_beta > 0, stored_reference=False)
        self.build_rollouts()
        self.old = OldPolicy(self.trainable_parameters)

    def balance_every(self) -> int:
        return self.config.online.marble_every

    # -- checkpoints: the old policy beside the trained parameters --------------------------------------------
    def _save_trainable_only(self, models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        super()._save_trainable_only(models, weights, output_dir)
        if self.accelerator.is_main_process:
            save_file(self.old.state_dict(self._trainable_names()), str(Path(output_dir) / OLD_POLICY_FILE))

    def _load_trainable_only(self, models: list[torch.nn.Module], input_dir: str) -> None:
        super()._load_trainable_only(models, input_dir)
        path = Path(input_dir) / OLD_POLICY_FILE
        if not path.is_file():
            raise ValueError(f"{input_dir}: no {OLD_POLICY_FILE}; was this checkpoint written by train.method nft?")
        self.old.load_state_dict(load_file(str(path)), self._trainable_names(), str(path))

    # -- one rollout epoch ---------------------------------------------------------------------------------------
    def make_buffer(self, r: int) -> tuple[NFTBuffer, list[dict[str, Any]]]:
        oc, nc = self.config.online, self.config.nft
        if r > 0:  # the end of epoch r - 1 (also when resuming: the checkpoint holds the old policy before it)
            self.old.update(old_policy_decay(r * self.steps_per_rollout, nc.old_policy_decay))
        with self.old.active():
            prompts, parts, images = self.sample(r)
        scores = self.score(images, prompts)
        groups = torch.arange(scores.total.shape[0]) // self.group_size
        advantages = nft_advantages(scores.total, groups, global_std=nc.global_std)
        columns = None
        if scores.per_reward is not None:
            columns = per_reward_advantages(scores.per_reward, groups, global_std=nc.global_std)
        ids = self.local_ids()
        local = slice(ids[0], ids[0] + self.local_samples)
        n, steps = self.local_samples, self.schedule.num_steps
        gen = torch.Generator().manual_seed(sample_key(self.config.train.seed, r, 0, ORDER_STREAM))
        orders, units = [], []
        for epoch in range(oc.inner_epochs):
            rows = torch.randperm(n, generator=gen).tolist()
            orders.append(torch.stack([torch.randperm(steps, generator=gen) for _ in range(n)]))
            for m in range(self.micro_per_pass):
                batch_rows = rows[m :: self.micro_per_pass]
                units += [{"rows": batch_rows, "epoch": epoch, "j": j} for j in range(self.units_per_micro_batch())]
        metrics = self.rollout_metrics(images, prompts, scores)
        metrics["advantage/abs_mean"] = advantages[local].abs().mean().reshape(1)
        device = self.accelerator.device
        buffer = NFTBuffer(
            rollout=r,
            ids=ids,
            clean=torch.cat([t.latents[:, -1] for t in parts]),
            cond={key: torch.cat([t.cond[key] for t in parts]) for key in parts[0].cond},
            advantages=advantages[local].to(device),
            reward_advantages=columns[local].to(device) if columns is not None else None,
            timestep_order=orders,
            metrics=metrics,
        )
        return buffer, units

    # -- one (micro-batch, timestep) ------------------------------------------------------------------------------
    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        oc, nc = self.config.online, self.config.nft
        buffer: NFTBuffer = batch["buffer"]
        device = self.accelerator.device
        rows = torch.tensor(batch["rows"])
        x0 = buffer.clean[rows].to(device)
        cond = {k: v[rows.to(v.device)] for k, v in buffer.cond.items()}
        timesteps = self.schedule.timesteps[buffer.timestep_order[batch["epoch"]][rows, batch["j"]]].to(device)
        seed = sample_key(self.config.train.seed, buffer.rollout, batch["epoch"], TRAIN_NOISE_STREAM)
        ids = [buffer.ids[i] for i in batch["rows"]]
        noise = per_sample_normal(tuple(x0.shape[1:]), seed, batch["j"], ids).to(device)
        x_t = self.adapter.add_noise(x0, noise, timesteps)
        target = self.adapter.target(x0, noise, timesteps)
        scale = self.adapter.x0_error_scale(timesteps).to(device)
        g = self.settings.guidance_scale

        with torch.no_grad():
            plain = self.adapter.with_denoiser(unwrap(self.model))  # no DDP hooks in the no-grad forwards
            with self.old.active():
                old = guided_prediction(plain, x_t, timesteps, cond, self.uncond, g)
            ref = None
            if nc.kl_beta > 0:
                with self.reference.network() as reference:
                    ref = guided_prediction(self.adapter.with_denoiser(reference), x_t, timesteps, cond, self.uncond, g)
        velocity = guided_prediction(self.adapter, x_t, timesteps, cond, self.uncond, g)

        def loss_with(advantages: torch.Tensor, kl: float):
            r = probability_from_advantage(advantages, adv_clip_max=oc.adv_clip_max, adv_mode=nc.adv_mode)
            return nft_loss(
                velocity,
                old,
                target,
                r,
                scale,
                beta=nc.beta,
                adaptive_weighting=nc.adaptive_weighting,
                policy_scale=oc.adv_clip_max,
                ref_velocity=ref,
                kl_coef=kl,
            )

        balance = self.balance
        solving = self.solves_balance(batch)
        columns = buffer.reward_advantages[rows.to(device)] if buffer.reward_advantages is not None else None
        balance_metrics: dict[str, torch.Tensor] = {}
        if balance is not None and balance.marble and solving:  # the full step: K + 1 backward passes
            per_reward = [loss_with(columns[:, k], 0.0).loss for k in range(columns.shape[1])]
            with torch.no_grad():  # only its metrics: no graph; the KL term is added to the update below
                out = loss_with(balance.blend(columns), nc.kl_beta)
            loss, balance_metrics = balance.balanced_loss(per_reward)
            if ref is not None:
                loss = loss + nc.kl_beta * ((velocity.float() - ref.float()) ** 2).mean(dim=(1, 2, 3)).mean()
        else:
            advantages = (
                balance.blend(columns) if balance is not None and balance.marble else buffer.advantages[rows.to(device)]
            )
            out = loss_with(advantages, nc.kl_beta)
            loss = out.loss
            if balance is not None and solving:  # the weighted sum's diagnostics
                per_reward = [loss_with(columns[:, k], 0.0).loss for k in range(columns.shape[1])]
                balance_metrics = balance.diagnose(per_reward, out.loss)
        metrics = {name: value.detach().float().reshape(1).cpu() for name, value in out.metrics.items()}
        metrics.update(balance_metrics)
        if batch["first"]:
            metrics.update(buffer.metrics)
        return loss, metrics
