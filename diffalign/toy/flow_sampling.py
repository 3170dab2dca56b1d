"""Samplers of the toy flow model: the Euler ODE and Flow-GRPO's SDE, with classifier-free guidance, in pixel space.

Both walk the ``FlowMatchEulerDiscreteScheduler`` schedule of ``steps`` sigmas from σ = 1 down to 0 (shift 1:
σ_k = 1 - k·(1 - 0.001)/(steps - 1), then a terminal 0):

* ODE (``noise_level = 0``): the scheduler's Euler step ``x' = x + (σ' - σ)·v`` (SD3's sampler).
* SDE (``noise_level = a > 0``): :func:`diffalign.models.sampling.flow_sde_step` (``sde_step`` here), the
  Euler–Maruyama step of Flow-GRPO's marginal-preserving reverse SDE (Liu et al., 2025, arXiv 2505.05470;
  ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``), the sampler Flow-GRPO rolls out with (``a = 0.7`` for
  SD3.5). It reduces to the Euler step at ``a = 0``.

The evaluation default is the ODE (``noise_level = 0``), as SD3 samples and Flow-GRPO evaluates. Measured on the
pretrained base (20 steps, CFG 3, 192 samples, seeds 0 / 1 / 2; :mod:`diffalign.toy.flow_pretrain`): ODE colour
adherence 0.53 / 0.53 / 0.47, shape adherence ≈ 0.71, diversity 0.86; SDE (a = 0.7) colour adherence
0.57 / 0.62 / 0.53, shape adherence ≈ 0.59, diversity 0.76 (its injected noise leaves grain that blurs edges and it
spreads positions less). Report both for a method trained with SDE rollouts; the UNet toy's reason for a stochastic
evaluation sampler (:mod:`diffalign.toy.sampling`) is a property of its DPO runs, not yet measured here.

Guidance (Ho & Salimans, 2022): ``v = v(x, "") + w · (v(x, prompt) - v(x, ""))``, ``w = guidance_scale`` (3, as the
UNet toy); the empty prompt is the unconditional input, as in pretraining's caption dropout.

Randomness is addressed per sample (``diffalign.utils.randomness``): the initial noise of sample ``i`` is
``per_sample_normal(seed, epoch=0, index=i)`` and, for ``noise_level > 0``, the noise of step ``k`` is
``per_sample_normal(seed, epoch=k + 1, index=i)``. Images therefore do not depend on ``batch_size``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from diffalign.models.sampling import flow_sde_step as sde_step
from diffalign.toy.flow_model import ToyFlowModel, load_toy_flow_model, predict_velocity
from diffalign.toy.metrics import summarize
from diffalign.toy.sampling import evaluation_prompts
from diffalign.toy.world import RESOLUTION
from diffalign.utils.randomness import NOISE, per_sample_normal

EVAL_STEPS = 20
EVAL_GUIDANCE_SCALE = 3.0
EVAL_NOISE_LEVEL = 0.0
SDE_NOISE_LEVEL = 0.7


@torch.no_grad()
def generate(
    model: ToyFlowModel,
    prompts: Sequence[str],
    *,
    seed: int,
    steps: int = EVAL_STEPS,
    guidance_scale: float = EVAL_GUIDANCE_SCALE,
    noise_level: float = EVAL_NOISE_LEVEL,
    batch_size: int = 96,
) -> torch.Tensor:
    """Sample one image per prompt: float32 ``[N, 3, 16, 16]`` in [0, 1] on the CPU.

    ``noise_level = 0`` runs the scheduler's own Euler ``step`` (the ODE); ``noise_level > 0`` runs :func:`sde_step`
    (Flow-GRPO's SDE, 0.7 in its SD3 configs) on the same sigmas. ``guidance_scale == 1`` skips the unconditional
    pass. Images are ``(x + 1) / 2`` clamped to [0, 1] (the model works in [-1, 1]).
    """
    if len(prompts) == 0:
        return torch.zeros(0, 3, RESOLUTION, RESOLUTION)
    if steps < 1 or batch_size < 1 or noise_level < 0:
        raise ValueError(
            f"generate: steps={steps} and batch_size={batch_size} must be >= 1, noise_level={noise_level} >= 0"
        )
    transformer = model.transformer
    device, dtype = transformer.device, transformer.dtype
    cfg = transformer.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        uncond_embeds, uncond_pooled = (t.to(device, dtype) for t in model.encode_prompts([""]))
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.float()
    images = []
    for start in range(0, len(prompts), batch_size):
        indices = list(range(start, min(start + batch_size, len(prompts))))
        embeds, pooled = (t.to(device, dtype) for t in model.encode_prompts([prompts[i] for i in indices]))
        if use_cfg:
            embeds = torch.cat([uncond_embeds.expand_as(embeds), embeds])
            pooled = torch.cat([uncond_pooled.expand_as(pooled), pooled])
        x = per_sample_normal(shape, seed, 0, indices, NOISE).to(device, dtype)
        scheduler.set_timesteps(steps)  # resets the step index of the scheduler's own Euler step
        for k, t in enumerate(scheduler.timesteps):
            if use_cfg:
                v_uncond, v_cond = predict_velocity(transformer, torch.cat([x, x]), sigmas[k], embeds, pooled).chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            else:
                v = predict_velocity(transformer, x, sigmas[k], embeds, pooled)
            if noise_level == 0.0:
                x = scheduler.step(v, t, x, return_dict=False)[0]
            else:
                noise = per_sample_normal(shape, seed, k + 1, indices, NOISE).to(device)
                step = sde_step(
                    v, x, sigmas[k], sigmas[k + 1], noise_level=noise_level, sigma_max=sigmas[1].item(), noise=noise
                )
                x = step.prev_sample.to(dtype)
        images.append(((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(images)


def evaluate_flow_model(
    model: str | os.PathLike | ToyFlowModel,
    *,
    n_per_prompt: int = 16,
    seed: int = 0,
    steps: int = EVAL_STEPS,
    guidance_scale: float = EVAL_GUIDANCE_SCALE,
    noise_level: float = EVAL_NOISE_LEVEL,
    batch_size: int = 96,
) -> dict[str, float]:
    """Generate ``n_per_prompt`` samples of each of the 12 prompts and return
    :func:`diffalign.toy.metrics.summarize` of them (``adherence``, ``shape_adherence``, ``diversity``, ...)."""
    if not isinstance(model, ToyFlowModel):
        model = load_toy_flow_model(model)
    prompts = evaluation_prompts(n_per_prompt)
    images = generate(
        model,
        prompts,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        noise_level=noise_level,
        batch_size=batch_size,
    )
    return summarize(images, prompts)
