"""Direct reward back-propagation (SRPO / Direct-Align style), the trainer of both D²-Align stages.

Per micro-batch of prompts (D²-Align, arXiv 2512.24146, Algorithms 1-2; reward path after SRPO / Direct-Align):

1. generate clean samples ``x0`` with the current generator (deterministic sampler, ``online.sample_steps`` steps,
   CFG ``online.guidance_scale``; no gradient);
2. add known noise: ``σ ~ U[online.direct_sigma_range]``, ``ε ~ N(0, I)`` (addressed per sample), ``x_σ`` the forward
   process sample;
3. one denoising step with the generator (no CFG: the paper trains at guidance 1) from ``σ`` to ``σ' = σ − 1/steps``,
   then remove the *known* noise: flow ``x̂0 = (x_σ' − σ'·ε)/(1 − σ')``, DDPM ``x̂0 = (x_t' − sqrt(1 − ᾱ')·ε)/sqrt(ᾱ')``
   (the paper's Algorithm 1; its eq. 4 ``x̂0 = (x_t − σ_t ε_θ)/α_t`` is the one-step prediction instead);
4. decode and score: ``loss = −mean(R(x̂0, c))``.

``online.direct_stage`` picks the stage's trainer (:data:`STAGE_TRAINERS`, :func:`direct_reward_trainer`); both
share :class:`DirectRewardTrainer`'s sampler, prompts and steps 1-3 and differ in what trains and in step 4:

* ``correction`` (stage 1, :class:`CorrectionStageTrainer`): the generator is frozen; the only parameter is
  D²-Align's ``b_v`` and the reward is the guided one, ``score(Φ_img(x̂0), ẽ)`` with ``ẽ = e⁻ + ω(e⁺ − e⁻)``,
  ``e± = normalize(e ± b_v)``; writes ``correction.safetensors``.
* ``generator`` (stage 2, and the uncorrected baseline; :class:`GeneratorStageTrainer`): the denoiser trains (LoRA or
  full) against the reward of ``online.reward_functions``, guided by a frozen ``b_v`` when
  ``online.reward_correction`` names one.

Paper: D²-Align, arXiv 2512.24146 (no code released; stage 1 3000 steps, stage 2 20 steps, ω 1.5, lr 5e-6 on
FLUX.1-dev with HPS-v2.1).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from diffalign.config import Config
from diffalign.data.prompts import PromptDataset, collate_prompts, load_prompts
from diffalign.eval.diversity import pvs
from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.loading import adapter_from_config
from diffalign.models.rollout import SamplerSettings, build_schedule, latents_to_images, rollout
from diffalign.rewards.base import EmbeddingReward
from diffalign.rewards.correction import CorrectionVector, save_correction
from diffalign.rewards.from_config import build_online_reward, reward_from_name
from diffalign.trainers.base import Trainer
from diffalign.trainers.diffusion_policy import DiffusionPolicyMixin
from diffalign.trainers.sharding import full_tensor
from diffalign.utils.modules import move_module
from diffalign.utils.randomness import per_sample_normal, per_sample_uniform, sample_key

GENERATION_STREAM, SIGMA_STREAM, RECON_NOISE_STREAM = 41, 42, 43


@dataclass
class GeneratedSamples:
    """Step 1's output for one micro-batch: the clean samples ``x0``, their conditioning and prompts, and the
    per-sample addresses (``indices``, ``epoch``) that steps 2-3 draw their noise from."""

    x0: torch.Tensor
    cond: dict[str, torch.Tensor]
    prompts: list[str]
    indices: list[int]
    epoch: int


class DirectRewardTrainer(DiffusionPolicyMixin, Trainer):
    """What both stages share: the deterministic sampler, the prompts and steps 1-3 (:meth:`reconstruct`); a stage
    provides the trained model and reward (:meth:`build_stage`) and step 4's rewards (:meth:`stage_rewards`)."""

    stage: str

    @abstractmethod
    def build_stage(self) -> DiffusionAdapter:
        """Set ``self.model`` (what trains) and ``self.reward``; return the generator's adapter."""

    @abstractmethod
    def stage_rewards(self, samples: GeneratedSamples, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """Step 4: per-sample rewards ``(B,)`` of the reconstructions of ``samples`` (the loss is their negative
        mean); may add stage metrics to ``metrics``."""

    def build(self) -> None:
        oc, dc = self.config.online, self.config.data
        adapter = self.build_stage()
        flow = adapter.prediction_type == "flow"
        self.settings = SamplerSettings(
            kind="ode" if flow else "ddim",
            steps=oc.sample_steps,
            guidance_scale=oc.guidance_scale,
            noise_level=0.0,
            resolution=dc.resolution,
        )
        self.schedule = build_schedule(adapter, self.settings)
        prompts = load_prompts(dc.path, split=dc.split, max_samples=dc.max_samples)
        self.dataset = PromptDataset([{"prompt": p} for p in prompts])
        self.collate = collate_prompts

    def reconstruct(
        self, x0: torch.Tensor, cond: dict[str, torch.Tensor], indices: list[int], epoch: int
    ) -> torch.Tensor:
        """Steps 2-3: noise ``x0`` with known noise, one generator step, remove the known noise (grad to the
        generator when it trains)."""
        adapter, seed, oc = self.adapter, self.config.train.seed, self.config.online
        lo, hi = oc.direct_sigma_range
        u = per_sample_uniform(seed, epoch, indices, SIGMA_STREAM).float().to(x0.device)
        sigma = lo + (hi - lo) * u
        eps = per_sample_normal(tuple(x0.shape[1:]), seed, epoch, indices, RECON_NOISE_STREAM).to(x0.device)
        view = (-1,) + (1,) * (x0.ndim - 1)
        delta = 1.0 / self.settings.steps
        if adapter.prediction_type == "flow":
            s, s_next = sigma.reshape(view), (sigma - delta).clamp(min=0.0).reshape(view)
            x_t = (1.0 - s) * x0 + s * eps
            v = adapter.predict(x_t, sigma * adapter.num_train_timesteps, cond).float()
            x_next = x_t + (s_next - s) * v
            return (x_next - s_next * eps) / (1.0 - s_next)
        steps_total = adapter.num_train_timesteps
        t = (sigma * steps_total).long().clamp(1, steps_total - 1)
        t_next = (t - int(delta * steps_total)).clamp(min=0)
        alphas = adapter.scheduler.alphas_cumprod.float().to(x0.device)
        a_t, a_next = alphas[t].reshape(view), alphas[t_next].reshape(view)
        x_t = a_t.sqrt() * x0 + (1.0 - a_t).sqrt() * eps
        out = adapter.predict(x_t, t, cond).float()
        if adapter.prediction_type == "epsilon":
            eps_hat = out
            x0_hat = (x_t - (1.0 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        else:
            x0_hat = a_t.sqrt() * x_t - (1.0 - a_t).sqrt() * out
            eps_hat = a_t.sqrt() * out + (1.0 - a_t).sqrt() * x_t
        x_next = a_next.sqrt() * x0_hat + (1.0 - a_next).sqrt() * eps_hat
        return (x_next - (1.0 - a_next).sqrt() * eps) / a_next.sqrt()

    def reconstructed_images(self, samples: GeneratedSamples) -> torch.Tensor:
        """Steps 2-3 on ``samples`` (:meth:`reconstruct`), decoded to images."""
        return latents_to_images(
            self.adapter, self.reconstruct(samples.x0, samples.cond, samples.indices, samples.epoch)
        )

    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prompts, indices = [row["prompt"] for row in batch["rows"]], batch["index"].tolist()
        seed = sample_key(self.config.train.seed, epoch, 0, GENERATION_STREAM)
        traj = rollout(self.adapter, prompts, self.settings, seed=seed, indices=indices, schedule=self.schedule)
        samples = GeneratedSamples(traj.latents[:, -1], traj.cond, prompts, indices, epoch)
        metrics: dict[str, torch.Tensor] = {}
        rewards = self.stage_rewards(samples, metrics)
        metrics["reward"] = rewards.detach()
        metrics["mean_brightness"] = traj.images.mean(dim=(1, 2, 3)).detach()
        metrics["diversity/pvs"] = torch.tensor([pvs(traj.images)])  # over the batch's prompts (one image each)
        return -rewards.mean(), metrics


class CorrectionStageTrainer(DirectRewardTrainer):
    """D²-Align stage 1 (``online.direct_stage=correction``): learn the correction vector ``b_v`` of one embedding
    reward against the frozen generator; writes ``correction.safetensors``."""

    stage = "correction"

    def build_stage(self) -> DiffusionAdapter:
        oc, device = self.config.online, self.accelerator.device
        adapter = adapter_from_config(self.config.model)
        for module in (adapter.denoiser, *adapter.frozen_modules()):
            move_module(module.requires_grad_(False), device, self.weight_dtype).eval()
        self.adapter = adapter
        if len(oc.reward_functions) != 1:
            raise ValueError("online.direct_stage=correction learns b_v for one embedding reward; list exactly one")
        self.reward = reward_from_name(oc.reward_functions[0], oc.reward_options.get(oc.reward_functions[0]))
        if hasattr(self.reward, "to"):
            self.reward = self.reward.to(device)
        if not isinstance(self.reward, EmbeddingReward):
            raise TypeError(f"reward '{oc.reward_functions[0]}' has no text-embedding space for D²-Align's b_v")
        dim = self.reward.text_embeds([""]).shape[-1]
        self.model = CorrectionVector(dim).to(device)
        return adapter

    def after_prepare(self) -> None:
        """Nothing to hand the adapter: the generator stays frozen and unwrapped."""

    def stage_rewards(self, samples: GeneratedSamples, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guided reward ``score(Φ_img(x̂0), ẽ)``; gradient to ``b_v`` only. Logs the plain reward and ‖b_v‖."""
        with torch.no_grad():
            image_embeds = self.reward.image_embeds(self.reconstructed_images(samples))
            text = self.reward.text_embeds(samples.prompts).to(image_embeds.device)
            metrics["reward/plain"] = self.reward.score_embeds(image_embeds, text).float().detach()
        guided = self.model(text, self.config.online.correction_omega)
        rewards = self.reward.score_embeds(image_embeds, guided).float()
        metrics["b_v_norm"] = self.model_vector().norm().detach().reshape(1)
        return rewards

    def model_vector(self) -> torch.Tensor:
        return self.accelerator.unwrap_model(self.model).b_v

    def save_final(self) -> None:
        """``correction.safetensors`` (:func:`~diffalign.rewards.correction.save_correction`) on the main process."""
        vector = full_tensor(self.model_vector())  # FSDP2: a collective on every rank
        if not self.accelerator.is_main_process:
            return
        name = self.config.online.reward_functions[0]
        save_correction(vector, self.output_dir, omega=self.config.online.correction_omega, reward=name)


class GeneratorStageTrainer(DirectRewardTrainer):
    """Direct reward training (``online.direct_stage=generator``; D²-Align stage 2 with ``online.reward_correction``,
    the uncorrected baseline without): the denoiser trains against ``online.reward_functions``' reward."""

    stage = "generator"

    def build_stage(self) -> DiffusionAdapter:
        adapter = self.build_policy(needs_reference=False)
        self.reward = build_online_reward(self.config.online, self.accelerator.device)
        return adapter

    def stage_rewards(self, samples: GeneratedSamples, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reward of the reconstructed images, back-propagated through the one generator step."""
        return self.reward(self.reconstructed_images(samples), samples.prompts).float()


STAGE_TRAINERS: dict[str, type[DirectRewardTrainer]] = {
    "correction": CorrectionStageTrainer,
    "generator": GeneratorStageTrainer,
}


def direct_reward_trainer(config: Config) -> DirectRewardTrainer:
    """The trainer of ``config.online.direct_stage`` (``train.method=direct_reward``)."""
    return STAGE_TRAINERS[config.online.direct_stage](config)
