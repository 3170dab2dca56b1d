"""The implicit Diffusion-DPO reward of an image (SAIL's self-annotation, arXiv 2602.05380 eq. 8)::

    r(y, x) = −(β/2) · mean_d [ ‖ε_d − ε_θ(x_{t_d}, y, t_d)‖² − ‖ε_d − ε_ref(x_{t_d}, y, t_d)‖² ]

over ``D`` draws ``(t_d, ε_d)`` (the paper: 10). ``‖·‖²`` is this library's per-sample MSE (mean over C, H, W) of the
backbone's own target, the same quantity as in the Diffusion-DPO loss. The draws are shared by all candidates of a
prompt (common random numbers, our choice), so a ranking compares images, not noise draws: draw ``d``
of prompt group ``g`` is addressed by ``(seed, epoch, g·D + d)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffalign.models.diffusion import DiffusionAdapter


@torch.no_grad()
def implicit_dpo_rewards(
    policy: DiffusionAdapter,
    reference: DiffusionAdapter,
    x0: Tensor,
    cond: dict[str, Tensor],
    groups: Sequence[int],
    *,
    beta: float,
    draws: int = 10,
    seed: int = 0,
    epoch: int = 0,
    batch_size: int = 64,
) -> Tensor:
    """``(N,)`` float32 rewards of clean latents ``x0`` (one row per candidate) conditioned on ``cond``; ``groups[i]``
    is candidate ``i``'s prompt group, whose candidates share their ``draws`` (t, ε) pairs."""
    n = x0.shape[0]
    if len(groups) != n:
        raise ValueError(f"implicit_dpo_rewards: {len(groups)} group ids for {n} candidates")
    shape = tuple(x0.shape[1:])
    total = torch.zeros(n)
    for d in range(draws):
        addresses = [int(g) * draws + d for g in groups]
        timesteps = policy.sample_timesteps(seed, epoch, addresses)
        noise = policy.sample_noise(shape, seed, epoch, addresses)
        for lo in range(0, n, batch_size):
            sl = slice(lo, lo + batch_size)
            c = {k: v[sl] for k, v in cond.items()}
            args = (x0[sl].to(policy.device), noise[sl].to(policy.device), timesteps[sl].to(policy.device))
            diff = policy.per_sample_mse(*args, c) - reference.per_sample_mse(*args, c)
            total[sl] += diff.float().cpu()
    return -0.5 * beta * total / draws
