"""Rollouts with log-probs over any backbone adapter (SD 1.x/2.x, SDXL: DDIM; SD3: flow SDE / CPS / DanceGRPO / ODE).

:func:`rollout` samples images the way the online RL papers do and keeps what training needs: every latent of the
trajectory, each step's log-prob and (optionally) mean, and the schedule. :func:`step_log_prob` re-evaluates one
stored step with the current weights — with the same batch, dtype and code path as the rollout, the ratio is exactly
1 in fp32 (tests check it bit for bit).

* Classifier-free guidance: ``v = v_u + w·(v_c − v_u)`` from one forward of the concatenated ``[uncond; cond]``
  batch (empty negative prompt), in rollouts and in training (flow_grpo's ``train.cfg``); ``w = 1`` skips it. The
  combination is the adapter's :meth:`~diffalign.models.diffusion.DiffusionAdapter.combine_guidance` (Qwen-Image
  renormalises it).
* Randomness is addressed per sample: initial noise ``per_sample_normal(seed, epoch=0, index)`` and step ``k``'s
  noise ``per_sample_normal(seed, epoch=k + 1, index)``, so images do not depend on batch size or process count.
  ``noise_indices`` lets a group share its initial noise (flow_grpo ``same_latent``, DanceGRPO ``init_same_noise``).
* Windowed SDE (Flow-GRPO-Fast): only steps ``window`` are stochastic (and trained); the rest run the ODE.
* Schedules: flow models use their pipeline's (:meth:`~diffalign.models.flow.FlowMatchingAdapter.sampling_schedule`:
  the static shift, or FLUX's resolution-dependent one) with ``steps`` sigmas, except ``dance``, which takes
  DanceGRPO's grid (:func:`~diffalign.models.sampling.dance_sigmas`; :func:`build_schedule`); DDPM
  models use ``DDIMScheduler`` timesteps built from the adapter's scheduler config, ``t_prev = max(t − T/steps, 0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.sampling import (
    FLOW_KINDS,
    SAMPLER_KINDS,
    SIGMA_SCHEDULES,
    StepOutput,
    cps_step,
    dance_sde_step,
    dance_sigmas,
    ddim_step,
    flow_sde_step,
)
from diffalign.utils.randomness import NOISE, per_sample_normal


@dataclass(frozen=True)
class SamplerSettings:
    """How rollouts sample. ``kind``: ``sde`` (Flow-GRPO), ``cps``, ``dance`` (DanceGRPO, ``noise_level`` = η),
    ``ode`` (deterministic), ``ddim`` (SD/SDXL, ``noise_level`` = η)."""

    kind: str = "sde"
    steps: int = 10
    guidance_scale: float = 4.5
    noise_level: float = 0.7
    resolution: int = 512

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"sampler kind {self.kind!r}: expected one of {SAMPLER_KINDS}")
        if self.steps < 1 or self.noise_level < 0 or self.guidance_scale < 0:
            raise ValueError(
                f"sampler: steps={self.steps} >= 1, noise_level={self.noise_level} >= 0 and "
                f"guidance_scale={self.guidance_scale} >= 0 required"
            )


@dataclass
class Schedule:
    """``timesteps`` (S,) given to the denoiser; flow: ``sigmas`` (S + 1,); DDIM: ``alpha_bars`` and
    ``alpha_bars_prev`` (S,)."""

    timesteps: Tensor
    sigmas: Tensor | None = None
    alpha_bars: Tensor | None = None
    alpha_bars_prev: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def is_flow(adapter: DiffusionAdapter) -> bool:
    return adapter.prediction_type == "flow"


def build_schedule(adapter: DiffusionAdapter, settings: SamplerSettings, sigma_schedule: str | None = None) -> Schedule:
    """The sampler's ``settings.steps``-step schedule for this adapter.

    Flow models: ``sigma_schedule`` picks the grid (one of ``SIGMA_SCHEDULES``); ``None`` takes the sampler's own —
    DanceGRPO's :func:`~diffalign.models.sampling.dance_sigmas` for ``dance``, the backbone pipeline's
    (:meth:`~diffalign.models.flow.FlowMatchingAdapter.sampling_schedule`) for every other sampler. ``"pipeline"``
    gives a ``dance`` rollout the pipeline's grid instead. The DanceGRPO grid's shift is the scheduler config's static
    ``shift``, also for a dynamically shifted scheduler (``use_dynamic_shifting``): DanceGRPO's
    ``fastvideo/train_grpo_flux.py`` shifts ``linspace(1, 0, S + 1)`` by its static ``--shift`` (3 in its FLUX
    scripts, FLUX.1-dev's config value) and never uses the resolution-dependent ``mu``. (Qwen-Image's config shift is
    1, an unshifted grid, where DanceGRPO's Qwen-Image script passes ``--shift 3``.) DDPM models: DDIM timesteps.
    """
    if is_flow(adapter) != (settings.kind in FLOW_KINDS):
        raise ValueError(
            f"sampler kind {settings.kind!r} does not fit a {'flow' if is_flow(adapter) else 'DDPM'} model: use one of "
            f"{FLOW_KINDS if is_flow(adapter) else ('ddim',)}"
        )
    if sigma_schedule is not None and sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"sigma schedule {sigma_schedule!r}: expected one of {SIGMA_SCHEDULES} (or None)")
    if is_flow(adapter):
        grid = sigma_schedule or ("dance" if settings.kind == "dance" else "pipeline")
        if grid == "dance":
            shift = float(adapter.scheduler.config.get("shift", 1.0))
            timesteps, sigmas = dance_sigmas(settings.steps, shift, adapter.num_train_timesteps)
        else:  # the backbone's pipeline schedule (static shift, or FLUX's resolution-dependent mu)
            timesteps, sigmas = adapter.sampling_schedule(settings.steps, settings.resolution)
        return Schedule(timesteps=timesteps, sigmas=sigmas)
    scheduler = DDIMScheduler.from_config(adapter.scheduler.config)
    scheduler.set_timesteps(settings.steps)
    timesteps = scheduler.timesteps.long().cpu()
    prev = (timesteps - adapter.num_train_timesteps // settings.steps).clamp(min=0)
    alphas = adapter.scheduler.alphas_cumprod.float().cpu()
    return Schedule(timesteps=timesteps, alpha_bars=alphas[timesteps], alpha_bars_prev=alphas[prev])


def sampler_step(
    settings: SamplerSettings,
    schedule: Schedule,
    k: int,
    model_output: Tensor,
    sample: Tensor,
    *,
    stochastic: bool = True,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    prediction_type: str = "flow",
) -> StepOutput:
    """Step ``k`` of the schedule with the configured sampler (``stochastic=False``: the ODE / DDIM η = 0 step)."""
    level = settings.noise_level if stochastic else 0.0
    if settings.kind == "ddim":
        return ddim_step(
            model_output,
            sample,
            schedule.alpha_bars[k],
            schedule.alpha_bars_prev[k],
            eta=level,
            prediction_type=prediction_type,
            noise=noise,
            prev_sample=prev_sample,
        )
    sigma, sigma_next = schedule.sigmas[k], schedule.sigmas[k + 1]
    if settings.kind == "ode" or level == 0.0:
        return flow_sde_step(
            model_output, sample, sigma, sigma_next, noise_level=0.0, sigma_max=1.0, prev_sample=prev_sample
        )
    if settings.kind == "sde":
        return flow_sde_step(
            model_output,
            sample,
            sigma,
            sigma_next,
            noise_level=level,
            sigma_max=float(schedule.sigmas[1]),
            noise=noise,
            prev_sample=prev_sample,
        )
    if settings.kind == "dance":
        return dance_sde_step(model_output, sample, sigma, sigma_next, eta=level, noise=noise, prev_sample=prev_sample)
    return cps_step(model_output, sample, sigma, sigma_next, noise_level=level, noise=noise, prev_sample=prev_sample)


def guided_prediction(
    adapter: DiffusionAdapter,
    x: Tensor,
    timestep: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    guidance_scale: float,
) -> Tensor:
    """The (guided) denoiser output at ``x``: one forward of ``[uncond; cond]`` when ``uncond`` is given, combined by
    ``adapter.combine_guidance`` (standard CFG unless the backbone guides otherwise).

    ``timestep``: one for the batch or one per sample. ``uncond`` may hold one row (the empty prompt), broadcast to the
    batch; keys it lacks (data conditioning such as SDXL's time ids from a training batch) are taken from ``cond``."""
    n = x.shape[0]
    timesteps = timestep.reshape(-1).to(x.device)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(n)
    if uncond is None or guidance_scale == 1.0:
        return adapter.predict(x, timesteps, cond)
    if not getattr(adapter, "uses_cfg", True):
        raise ValueError(
            f"{type(adapter).__name__} is guidance-distilled (its guidance is an embedding, model.guidance): set the "
            f"sampler's guidance scale to 1 (online.guidance_scale, soar.cfg_scale, sail.guidance_scale), not "
            f"{guidance_scale}"
        )
    unc = {k: uncond[k].expand(n, *uncond[k].shape[1:]) if k in uncond else cond[k] for k in cond}
    both = {k: torch.cat([unc[k], cond[k]]) for k in cond}
    out_u, out_c = adapter.predict(torch.cat([x, x]), torch.cat([timesteps, timesteps]), both).chunk(2)
    return adapter.combine_guidance(out_u, out_c, guidance_scale)


def conditioning(adapter: DiffusionAdapter, prompts: Sequence[str], resolution: int) -> dict[str, Tensor]:
    """Text conditioning plus the backbone's per-sample extras (SDXL ``time_ids`` for an uncropped square image)."""
    cond = adapter.encode_prompts(list(prompts))
    n = len(prompts)
    batch = {
        "index": torch.arange(n),
        "original_size": torch.tensor([[resolution, resolution]]).expand(n, 2),
        "crop_top_left": torch.zeros(n, 2, dtype=torch.long),
    }
    cond.update(adapter.batch_conditioning(batch, resolution))
    return {k: v.to(adapter.device) for k, v in cond.items()}


@dataclass
class Trajectory:
    """One rollout batch. ``latents`` (N, S + 1, ...) fp32 (``latents[:, 0]`` = initial noise), ``log_probs`` (N, S),
    ``means`` (N, S, ...) or None, per-step ``std`` / ``std_dev_t`` / ``sqrt_dt`` (S,), ``stochastic`` (S,) bool
    (the steps that are SDE steps, i.e. trainable), ``images`` (N, 3, H, W) in [0, 1], ``cond`` the prompts'
    conditioning the rollout used (for re-evaluating its steps)."""

    prompts: list[str]
    latents: Tensor
    log_probs: Tensor
    means: Tensor | None
    std: Tensor
    std_dev_t: Tensor
    sqrt_dt: Tensor
    stochastic: Tensor
    images: Tensor
    cond: dict[str, Tensor]


def latents_to_images(adapter: DiffusionAdapter, latents: Tensor) -> Tensor:
    """Decode to float images in [0, 1]: ``(adapter.decode_latents(latents) + 1) / 2`` clamped (pixel-space models:
    ``(x + 1)/2``); keeps gradients if ``latents`` has them."""
    pixels = adapter.decode_latents(latents)
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def rollout(
    adapter: DiffusionAdapter,
    prompts: Sequence[str],
    settings: SamplerSettings,
    *,
    seed: int,
    indices: Sequence[int],
    noise_indices: Sequence[int] | None = None,
    window: tuple[int, int] | None = None,
    keep_means: bool = False,
    schedule: Schedule | None = None,
) -> Trajectory:
    """Sample ``len(prompts)`` images (one forward batch) and record the trajectory.

    ``indices`` address each sample's step noise, ``noise_indices`` (default ``indices``) its initial noise.
    ``window = (start, stop)``: steps in ``[start, stop)`` are stochastic, the others deterministic (Flow-GRPO-Fast);
    default: every step stochastic.
    """
    if len(prompts) != len(indices):
        raise ValueError(f"rollout: {len(prompts)} prompts but {len(indices)} indices")
    schedule = schedule or build_schedule(adapter, settings)
    device, steps = adapter.device, schedule.num_steps
    shape = adapter.latent_shape(settings.resolution, settings.resolution)
    cond = conditioning(adapter, prompts, settings.resolution)
    uncond = conditioning(adapter, [""], settings.resolution) if settings.guidance_scale != 1.0 else None
    stochastic = torch.zeros(steps, dtype=torch.bool)
    start, stop = window if window is not None else (0, steps)
    stochastic[start:stop] = settings.kind != "ode" and settings.noise_level > 0
    x = per_sample_normal(shape, seed, 0, list(noise_indices or indices), NOISE).to(device)
    latents, log_probs, means = [x], [], []
    stds, std_devs, sqrt_dts = [], [], []
    for k in range(steps):
        out = guided_prediction(adapter, x, schedule.timesteps[k], cond, uncond, settings.guidance_scale)
        noise = per_sample_normal(shape, seed, k + 1, list(indices), NOISE).to(device) if stochastic[k] else None
        step = sampler_step(
            settings,
            schedule,
            k,
            out,
            x,
            stochastic=bool(stochastic[k]),
            noise=noise,
            prediction_type=adapter.prediction_type,
        )
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
        if keep_means:
            means.append(step.mean)
        stds.append(step.std[0])
        std_devs.append(step.std_dev_t[0])
        sqrt_dts.append(step.sqrt_dt[0])
    return Trajectory(
        prompts=list(prompts),
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        means=torch.stack(means, dim=1) if keep_means else None,
        std=torch.stack(stds).cpu(),
        std_dev_t=torch.stack(std_devs).cpu(),
        sqrt_dt=torch.stack(sqrt_dts).cpu(),
        stochastic=stochastic,
        images=latents_to_images(adapter, x),
        cond=cond,
    )


def step_log_prob(
    adapter: DiffusionAdapter,
    settings: SamplerSettings,
    schedule: Schedule,
    k: int,
    latents: Tensor,
    next_latents: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
) -> StepOutput:
    """Re-evaluate stochastic step ``k`` (``latents → next_latents``) with the adapter's denoiser: the current weights,
    or a reference network through ``adapter.with_denoiser(module)``."""
    out = guided_prediction(adapter, latents, schedule.timesteps[k], cond, uncond, settings.guidance_scale)
    return sampler_step(
        settings, schedule, k, out, latents, prev_sample=next_latents, prediction_type=adapter.prediction_type
    )
