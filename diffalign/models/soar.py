"""SOAR's auxiliary supervision points on any backbone (SOAR, arXiv 2604.12617; the authors' code,
``Tencent-Hunyuan/HY-SOAR`` ``soar/utils/algorithm.py``).

For a training sample (clean ``x0``, noise ``ε``, on-trajectory timestep ``t0``):

1. one stop-gradient CFG step of a ``K``-step schedule from ``x_{t0}`` (the current weights, ``[uncond; cond]`` in one
   forward), to ``t1``: ``K`` steps span the ``T`` training timesteps, so ``t1`` is ``T/K`` grid positions cleaner
   than ``t0`` (the code's ``t1 = max(t0 − 1/K, 0)`` on the shifted grid); optional extra stochastic paths;
2. ``M`` levels ``s' ~ U[s1, s_max]`` per path, the state re-noised toward the *same* noise ``ε``
   (:func:`~diffalign.losses.soar.soar_renoise`);
3. the target that maps each auxiliary state back to ``x0`` in one step
   (:func:`~diffalign.losses.soar.soar_correction_velocity`), in the backbone's own parameterisation.

Backbones: the computation runs in flow coordinates ``z = x_t/(a_t + b_t)``, ``s = b_t/(a_t + b_t)`` (identity for
SD3). On SD 1.x/2.x/SDXL a DDIM (η = 0) step is exactly an Euler step in these coordinates, and the correction target
becomes ``ε_corr = (z' − (1 − s')·x0)/s'`` (ε-prediction) or ``a'·ε_corr − b'·x0`` (v-prediction) — our ε-form of
the target (derived here: neither the paper nor the code has one).

Choices (ours, where the code is specific to SD3): ``s_max`` is the noisiest grid level (1 on SD3, as the code's upper
bound; ≈ 0.94 on SD 1.5, which never reaches pure noise); the model timestep of ``s'`` is the first grid level at or
below ``s'`` (the code's ``searchsorted``); flow models keep the continuous ``s'`` in the state and target (as the
code), DDPM models use that grid level throughout (their UNet only knows integer timesteps). A sample is at the clean
boundary when ``t1`` would pass the last grid position; like the code, it then keeps only the ODE path. The level and
path draws come from (seed, epoch, sample index) streams, so a run is reproducible on any number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.losses.soar import soar_correction_velocity, soar_renoise
from diffalign.methods.soar import SOARConfig
from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.rollout import guided_prediction
from diffalign.models.sampling import cps_step, flow_sde_step
from diffalign.utils.randomness import per_sample_normal, sample_generator

SOAR_LEVEL_STREAM = 30
SOAR_PATH_STREAM = 31
#: SOAR's knobs are its config section (:class:`diffalign.methods.soar.SOARConfig`, the official code's defaults);
#: the functions here read them from it.
SOARSettings = SOARConfig


@dataclass
class AuxPoints:
    """The auxiliary supervision points of a batch, ``P = B·M`` (+ ``M`` per extra path and non-boundary sample)."""

    inputs: Tensor  # (P, C, H, W) states in the model's own space
    timesteps: Tensor  # (P,) model timesteps
    targets: Tensor  # (P, C, H, W) float32 regression targets in the model's parameterisation
    sample_index: Tensor  # (P,) int64: the batch row each point belongs to
    sigmas: Tensor  # (P,) flow-coordinate level s' of the point
    start_sigmas: Tensor  # (P,) level s1 of the off-trajectory state it was re-noised from
    states: Tensor  # (P, C, H, W) the point in flow coordinates (z')
    off_trajectory: Tensor  # (P, C, H, W) the one-step state ẑ_{s1} it was re-noised from (flow coordinates)


def grid_positions(grid: Tensor, timesteps: Tensor) -> Tensor:
    """Index of each timestep in the training grid (nearest value)."""
    return (grid.float()[None, :] - timesteps.float().to(grid.device)[:, None]).abs().argmin(dim=1)


def _uniforms(n: int, seed: int, epoch: int, indices: list[int], stream: int) -> Tensor:
    return torch.stack([torch.rand(n, generator=sample_generator(seed, epoch, i, stream)) for i in indices])


def _path_noise(shape: tuple[int, ...], path: int, seed: int, epoch: int, indices: list[int]) -> Tensor:
    """Noise of stochastic path ``path`` (≥ 1) for each sample: the last of ``path`` draws of its path stream."""
    return per_sample_normal((path, *shape), seed, epoch, indices, SOAR_PATH_STREAM)[:, -1]


def _stochastic_step(
    kind: str, z: Tensor, u: Tensor, s0: Tensor, s1: Tensor, noise: Tensor, level: float, s_max: float
):
    """One stochastic step of the code's ``stochastic_rollout_step`` in flow coordinates."""
    col = (-1,) + (1,) * (z.ndim - 1)
    if kind == "simple":  # Euler–Maruyama with additive noise
        dt = (s1 - s0).reshape(col)
        return z + u * dt + level * dt.abs().sqrt() * noise
    if kind == "sde":  # re-noise the clean estimate with fresh noise
        return (1.0 - s1.reshape(col)) * (z - s0.reshape(col) * u) + s1.reshape(col) * noise
    if kind == "flow_sde":
        return flow_sde_step(u, z, s0, s1, noise_level=level, sigma_max=s_max, noise=noise).prev_sample
    return cps_step(u, z, s0, s1, noise_level=level, noise=noise).prev_sample


def soar_aux_points(
    adapter: DiffusionAdapter,
    x0: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    settings: SOARSettings,
    *,
    seed: int,
    epoch: int,
    indices: list[int],
) -> AuxPoints:
    """SOAR's auxiliary points for a batch (see the module docstring); nothing here carries a gradient."""
    device = x0.device
    x0, noise = x0.float(), noise.float()
    col = (-1,) + (1,) * (x0.ndim - 1)
    grid = adapter.training_grid().to(device)
    a_grid, b_grid = (c.to(device) for c in adapter.noise_coefficients(grid))
    scale_grid = a_grid + b_grid
    s_grid = b_grid / scale_grid  # noisiest first
    T = grid.numel()
    flow = adapter.prediction_type == "flow"

    i0 = grid_positions(grid, timesteps)
    stride = T / settings.num_sampling_steps
    i1_raw = torch.floor(i0.double() + stride).long()
    at_boundary = i1_raw > T - 1
    i1 = i1_raw.clamp(max=T - 1)
    s0, s1 = s_grid[i0], s_grid[i1]

    x_t = adapter.add_noise(x0, noise, timesteps)
    with torch.no_grad():
        guided = guided_prediction(adapter, x_t, timesteps, cond, uncond, settings.cfg_scale).float()
    clean_hat, noise_hat = adapter.clean_and_noise(x_t, guided, timesteps)
    z_t = x_t / scale_grid[i0].reshape(col)
    velocity = noise_hat - clean_hat  # flow-coordinate velocity of the guided prediction
    paths = [(torch.arange(x0.shape[0], device=device), z_t + (s1 - s0).reshape(col) * velocity)]  # the ODE path
    active = (~at_boundary).nonzero().squeeze(1)
    for p in range(1, settings.num_paths):
        if active.numel() == 0:
            break
        fresh = _path_noise(tuple(x0.shape[1:]), p, seed, epoch, [indices[i] for i in active.tolist()]).to(device)
        z_p = _stochastic_step(
            settings.sde_type,
            z_t[active],
            velocity[active],
            s0[active],
            s1[active],
            fresh,
            settings.sde_noise,
            float(s_grid[1]) if T > 1 else float(s_grid[0]),
        )
        paths.append((active, z_p))

    M = settings.num_aux_points
    draws = _uniforms(M * settings.num_paths, seed, epoch, indices, SOAR_LEVEL_STREAM).to(device)
    s_top = s_grid[0]
    rows, levels, starts, states, inputs, model_t, targets, offs = [], [], [], [], [], [], [], []
    for p, (rows_p, z_off) in enumerate(paths):
        for m in range(M):
            r = draws[rows_p, p * M + m]
            start = s1[rows_p]
            level = start + r * (s_top - start)
            pos = torch.searchsorted(-s_grid.contiguous(), -level.contiguous()).clamp(0, T - 1)
            if not flow:
                level = s_grid[pos]
            state = soar_renoise(z_off, noise[rows_p], start, level)
            clean = x0[rows_p]
            if flow:
                target = soar_correction_velocity(state, clean, level)
            else:
                noise_corr = (state - (1.0 - level).reshape(col) * clean) / level.reshape(col)
                target = adapter.target(clean, noise_corr, grid[pos]).float()
            rows.append(rows_p)
            levels.append(level)
            starts.append(start)
            states.append(state)
            inputs.append(state * scale_grid[pos].reshape(col))
            model_t.append(grid[pos])
            targets.append(target)
            offs.append(z_off)
    return AuxPoints(
        inputs=torch.cat(inputs),
        timesteps=torch.cat(model_t),
        targets=torch.cat(targets),
        sample_index=torch.cat(rows),
        sigmas=torch.cat(levels),
        start_sigmas=torch.cat(starts),
        states=torch.cat(states),
        off_trajectory=torch.cat(offs),
    )
