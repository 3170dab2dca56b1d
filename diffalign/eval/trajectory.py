"""Error along a model's own sampling trajectory (exposure bias; the quantity SOAR corrects, arXiv 2604.12617).

Start from a data point's forward-process state ``x_{t_k}`` (clean ``x0``, noise ``ε``) at a step ``k`` of the
sampler's schedule and let the model sample from there with its own deterministic sampler (Euler ODE for flow
models, DDIM η = 0 otherwise; CFG). At every visited step its clean estimate ``x̂0`` is compared with the ``x0`` the
trajectory started from; the first step is on the data's trajectory, every later one on the model's own. SFT only
ever sees on-trajectory states; SOAR also trains the later, drifted ones.

* ``trajectory_error``: mean over start steps, visited steps and samples of ``mean_dims (x̂0 − x0)²``;
* ``trajectory_error_final``: the same for the sample the sampler ends on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.rollout import SamplerSettings, build_schedule, conditioning, guided_prediction, sampler_step


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).pow(2).mean(dim=tuple(range(1, a.ndim)))


@torch.no_grad()
def trajectory_error(
    adapter: DiffusionAdapter,
    x0: Tensor,
    noise: Tensor,
    prompts: Sequence[str],
    settings: SamplerSettings,
    *,
    start_fractions: Sequence[float] = (0.25, 0.5, 0.75),
) -> dict[str, float]:
    """Trajectory errors (see the module docstring) of ``adapter``'s sampler on clean latents ``x0`` with their
    ``noise``; each ``start_fraction`` f starts at step ``round((1 − f)·(steps − 1))`` (f = 1: pure noise end)."""
    if settings.kind not in ("ode", "ddim"):
        raise ValueError(f"trajectory_error needs a deterministic sampler ('ode' or 'ddim'), not {settings.kind!r}")
    deterministic = SamplerSettings(**{**vars(settings), "noise_level": 0.0})
    schedule = build_schedule(adapter, deterministic)
    steps = schedule.num_steps
    device = adapter.device
    x0, noise = x0.to(device).float(), noise.to(device).float()
    cond = conditioning(adapter, prompts, settings.resolution)
    uncond = conditioning(adapter, [""], settings.resolution) if settings.guidance_scale != 1.0 else None
    along, final = [], []
    for fraction in start_fractions:
        start = round((1.0 - fraction) * (steps - 1))
        t_start = schedule.timesteps[start].reshape(1).expand(x0.shape[0]).to(device)
        x = adapter.add_noise(x0, noise, t_start)
        for k in range(start, steps):
            t = schedule.timesteps[k]
            out = guided_prediction(adapter, x, t, cond, uncond, settings.guidance_scale)
            clean, _ = adapter.clean_and_noise(x, out, t.reshape(1).expand(x.shape[0]).to(device))
            along.append(_mse(clean, x0))
            x = sampler_step(
                deterministic, schedule, k, out, x, stochastic=False, prediction_type=adapter.prediction_type
            ).prev_sample
        final.append(_mse(x, x0))
    return {
        "trajectory_error": float(torch.cat(along).mean()),
        "trajectory_error_final": float(torch.cat(final).mean()),
    }
