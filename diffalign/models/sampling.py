"""Reverse-process steps that also return the Gaussian log-probability of the step taken, for online RL.

Every step returns a :class:`StepOutput`: the next sample ``x'``, ``log_prob`` (float32 ``(N,)``, a **mean** over
latent elements, as every reference implementation takes it), the step's mean ``μ``, its standard deviation ``std``
and Flow-GRPO's diffusion coefficient ``std_dev_t`` (σ_t; ``std = σ_t·sqrt_dt``). Everything is computed in fp32.
Given ``prev_sample`` the step is re-evaluated at that sample (training); given ``noise`` it samples
``x' = μ + std·noise`` (rollout); with neither ``x' = μ``.

Flow matching (``x_σ = (1 − σ)·x0 + σ·ε``, velocity ``v ≈ ε − x0``, ``Δ = σ' − σ < 0``):

* :func:`flow_sde_step` — Flow-GRPO's SDE (``sde_type='sde'``), noise level ``a``; ``a = 0`` is the Euler ODE step.
* :func:`dance_sde_step` — DanceGRPO's step: the same SDE with a constant coefficient ``σ_t ≡ η``, on DanceGRPO's own
  sigma grid :func:`dance_sigmas` (the SD3 shift of ``linspace(1, 0, S + 1)``).
* :func:`cps_step` — Coefficients-Preserving Sampling (``sde_type='cps'``), with its unnormalised log-prob.

DDPM-family (SD 1.x/2.x, SDXL; ε or v prediction): :func:`ddim_step` — DDPO's DDIM step with η.

Sources: ``yifan123/flow_grpo`` ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, ``XueZeyue/DanceGRPO``
``fastvideo/train_grpo_flux.py`` (``flux_step``), ``kvablack/ddpo-pytorch``
``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py`` (Flow-GRPO arXiv 2505.05470, DanceGRPO arXiv 2505.07818,
DDPO arXiv 2305.13301).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

FLOW_KINDS = ("sde", "dance", "cps", "ode")
DDIM_KINDS = ("ddim",)
SAMPLER_KINDS = FLOW_KINDS + DDIM_KINDS
# flow sigma grids: the backbone pipeline's (FlowMatchingAdapter.sampling_schedule) or DanceGRPO's (dance_sigmas)
SIGMA_SCHEDULES = ("pipeline", "dance")
_LOG_SQRT_2PI = math.log(math.sqrt(2.0 * math.pi))


class StepOutput(NamedTuple):
    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor  # (N,) standard deviation of the step's Gaussian
    std_dev_t: Tensor  # (N,) Flow-GRPO's σ_t (DDIM: equal to std)
    sqrt_dt: Tensor  # (N,) sqrt(−Δ) (DDIM: 1)


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    view = (-1,) + (1,) * (like.ndim - 1)
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(view) if value.numel() > 1 else value.reshape((1,) * like.ndim)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``mean_dims[ −(x − μ)²/(2 s²) − log s − log √(2π) ]``, float32 ``(N,)``; ``std`` broadcastable to ``x``."""
    log_prob = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, x.ndim)))


def _finish(mean: Tensor, std: Tensor, noise: Tensor | None, prev_sample: Tensor | None) -> tuple[Tensor, Tensor]:
    """The next sample and its Gaussian log-prob; a zero ``std`` is a deterministic step with log-prob 0."""
    if prev_sample is None:
        prev_sample = mean + std * noise.float() if noise is not None else mean
    prev_sample = prev_sample.float().detach()
    if bool((std == 0).all()):
        return prev_sample, torch.zeros(mean.shape[0], device=mean.device)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def _vectors(std_dev_t: Tensor, sqrt_dt: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return std_dev_t.reshape(-1).expand(n).clone(), sqrt_dt.reshape(-1).expand(n).clone()


def flow_sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    noise_level: float,
    sigma_max: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO's SDE step (``sde_step_with_logprob``, ``sde_type='sde'``), in fp32.

    With ``σ̃ = σ`` except ``σ̃ = sigma_max`` (the schedule's second sigma) where ``σ = 1``::

        σ_t = a · sqrt(σ / (1 − σ̃))
        μ   = x · (1 + σ_t²/(2σ) · Δ) + v · (1 + σ_t²(1 − σ)/(2σ)) · Δ
        x'  = μ + σ_t·sqrt(−Δ) · z

    i.e. Euler–Maruyama on ``dx = [v + σ_t²/(2σ)(x + (1 − σ)v)] dσ + σ_t dw``. At ``a = 0``: ``μ = x + Δ·v`` (the
    scheduler's Euler step) and the log-prob is 0 (a deterministic step).
    """
    x, v = sample.float(), velocity.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next - sigma
    sqrt_dt = torch.sqrt(-dt)
    if noise_level == 0.0:
        mean = x + dt * v
        zero = torch.zeros_like(sigma)
        out, log_prob = _finish(mean, zero, None, prev_sample)
        return StepOutput(
            out, log_prob, mean, zero.reshape(-1).expand(x.shape[0]).clone(), *_vectors(zero, sqrt_dt, x.shape[0])
        )
    sigma_safe = torch.where(sigma == 1.0, torch.full_like(sigma, sigma_max), sigma)
    std_dev_t = noise_level * torch.sqrt(sigma / (1.0 - sigma_safe))
    mean = x * (1.0 + std_dev_t**2 / (2.0 * sigma) * dt) + v * (1.0 + std_dev_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    std = std_dev_t * sqrt_dt
    out, log_prob = _finish(mean, std, noise, prev_sample)
    std_vec = std.reshape(-1).expand(x.shape[0]).clone()
    return StepOutput(out, log_prob, mean, std_vec, *_vectors(std_dev_t, sqrt_dt, x.shape[0]))


def dance_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """DanceGRPO's sigma grid: ``(timesteps (S,), sigmas (S + 1,))``, float32 on the CPU, with::

        s_k = 1 − k/S  (torch.linspace(1, 0, S + 1)),   σ_k = shift·s_k / (1 + (shift − 1)·s_k),   t_k = σ_k·T

    so ``σ_0 = 1`` and ``σ_S = 0``. Source: ``XueZeyue/DanceGRPO`` ``fastvideo/train_grpo_flux.py``
    (``sd3_time_shift`` applied in ``sample_reference_model``; the Qwen-Image, Wan and HunyuanVideo scripts build the
    same grid). The pipelines' ``set_timesteps`` grids differ: SD3's spans ``[1, σ_min]`` before its final 0, so at
    ``S = 16``, shift 3 its second-to-last sigma is 0.0089 where this grid has 0.1667 (the largest gap, 0.158).
    DanceGRPO feeds the transformer ``int(σ·1000)/1000``; ``t_k = σ_k·T`` here is not rounded, so the denoiser sees the
    sigma the step uses (at most 1/1000 apart).
    """
    if steps < 1 or shift <= 0:
        raise ValueError(f"dance_sigmas: steps={steps} >= 1 and shift={shift} > 0 required")
    grid = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * grid / (1.0 + (shift - 1.0) * grid)
    return sigmas[:-1] * num_train_timesteps, sigmas


def dance_sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    eta: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """DanceGRPO's ``flux_step`` (``sde_solver=True``), in fp32::

        x̂0 = x − σ·v,  score = −(x − (1 − σ)·x̂0)/σ²,  μ = x + Δ·v − ½η²·score·Δ,  std = η·sqrt(σ − σ')

    which is :func:`flow_sde_step`'s mean with the constant coefficient ``σ_t ≡ η`` (our algebra; a test checks it
    numerically). DanceGRPO takes its steps on :func:`dance_sigmas`, which ``online.sampler: dance`` rollouts use by
    default (16 steps, shift 3: up to 0.158 above the SD3 pipeline's sigmas).
    """
    x, v = sample.float(), velocity.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next - sigma
    x0_hat = x - sigma * v
    score = -(x - (1.0 - sigma) * x0_hat) / sigma**2
    mean = x + dt * v - 0.5 * eta**2 * score * dt
    sqrt_dt = torch.sqrt(-dt)
    std = eta * sqrt_dt
    out, log_prob = _finish(mean, std, noise, prev_sample)
    std_dev_t = torch.full_like(sigma, eta)
    return StepOutput(
        out, log_prob, mean, std.reshape(-1).expand(x.shape[0]).clone(), *_vectors(std_dev_t, sqrt_dt, x.shape[0])
    )


def cps_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    noise_level: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """Coefficients-Preserving Sampling (arXiv 2509.05952; flow_grpo ``sde_type='cps'``), in fp32::

        std = σ'·sin(a·π/2),  x̂0 = x − σ·v,  x̂1 = x + (1 − σ)·v
        μ   = (1 − σ')·x̂0 + sqrt(σ'² − std²)·x̂1,   x' = μ + std·z
        log_prob = −mean_dims((x' − μ)²)        # the code's unnormalised form: every constant dropped

    Ratios from this log-prob are on a different scale from the SDE's (flow_grpo pairs it with ``clip_range`` 1e-5).
    """
    x, v = sample.float(), velocity.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1.0 - sigma) * v
    mean = (1.0 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp(min=0.0)) * x1_hat
    if prev_sample is None:
        prev_sample = mean + std * noise.float() if noise is not None else mean
    prev_sample = prev_sample.float().detach()
    log_prob = -((prev_sample - mean) ** 2).mean(dim=tuple(range(1, x.ndim)))
    sqrt_dt = torch.sqrt(sigma - sigma_next)
    std_vec = std.reshape(-1).expand(x.shape[0]).clone()
    return StepOutput(
        prev_sample, log_prob, mean, std_vec, std_vec.clone(), sqrt_dt.reshape(-1).expand(x.shape[0]).clone()
    )


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_bar: float | Tensor,
    alpha_bar_prev: float | Tensor,
    *,
    eta: float,
    prediction_type: str = "epsilon",
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """DDPO's DDIM step with log-prob (``ddim_step_with_logprob``), in fp32, for ε- or v-prediction::

        ε:  x̂0 = (x − sqrt(1 − ᾱ_t)·ε̂)/sqrt(ᾱ_t)
        v:  x̂0 = sqrt(ᾱ_t)·x − sqrt(1 − ᾱ_t)·v̂,   ε̂ = sqrt(ᾱ_t)·v̂ + sqrt(1 − ᾱ_t)·x
        σ_t = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_prev)
        μ   = sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev − σ_t²)·ε̂,   x' = μ + σ_t·z

    ``ᾱ_prev`` is taken at ``max(t − T/steps, 0)`` (DDPO clamps, so the final ᾱ of diffusers' DDIM is never used).
    ``η = 0`` is deterministic DDIM (log-prob 0). No sample clipping (SD's scheduler configs have it off).
    """
    x, out = sample.float(), model_output.float()
    a_t, a_prev = _per_sample(alpha_bar, x), _per_sample(alpha_bar_prev, x)
    if prediction_type == "epsilon":
        eps = out
        x0_hat = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0_hat = a_t.sqrt() * x - (1.0 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1.0 - a_t).sqrt() * x
    else:
        raise ValueError(f"ddim_step: prediction_type {prediction_type!r} must be 'epsilon' or 'v_prediction'")
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * variance.clamp(min=0.0).sqrt()
    mean = a_prev.sqrt() * x0_hat + (1.0 - a_prev - std**2).clamp(min=0.0).sqrt() * eps
    prev, log_prob = _finish(mean, std, noise, prev_sample)
    std_vec = std.reshape(-1).expand(x.shape[0]).clone()
    ones = torch.ones(x.shape[0], device=x.device)
    return StepOutput(prev, log_prob, mean, std_vec, std_vec.clone(), ones)


__all__ = [
    "DDIM_KINDS",
    "FLOW_KINDS",
    "SAMPLER_KINDS",
    "StepOutput",
    "cps_step",
    "dance_sde_step",
    "ddim_step",
    "flow_sde_step",
    "gaussian_log_prob",
]
