"""SOAR (Self-Correction for Optimal Alignment and Refinement; arXiv 2604.12617, official code HY-SOAR
``soar/utils/algorithm.py`` and ``soar/train_soar_sd3_5m.py``): the tensor parts of the objective.

Everything here is in *flow coordinates*: a state on the ray of clean ``z0`` and noise ``z1`` at level ``s`` is
``z_s = (1 − s)·z0 + s·z1`` (SD3's rectified flow; a DDPM state ``x_t = a_t·x0 + b_t·ε`` maps onto it by
``z = x_t / (a_t + b_t)``, ``s = b_t / (a_t + b_t)``, see :mod:`diffalign.models.soar`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _col(values: Tensor, like: Tensor) -> Tensor:
    return values.float().reshape(-1, *([1] * (like.ndim - 1)))


def soar_renoise(off_trajectory: Tensor, noise: Tensor, start_sigma: Tensor, sigma: Tensor) -> Tensor:
    """Re-noise the off-trajectory state ``ẑ_{s1}`` toward the *same* noise endpoint ``z1`` (code, step 3)::

        α  = clamp((s' − s1) / (1 − s1), 0, 1)
        z' = (1 − α)·ẑ_{s1} + α·z1

    ``start_sigma`` is ``s1`` and ``sigma`` is ``s'`` (both ``(N,)``); float32 result. If ``ẑ_{s1}`` lies on the ray
    (no drift), ``z'`` is exactly the ray's state at ``s'``.
    """
    start, level = _col(start_sigma, off_trajectory), _col(sigma, off_trajectory)
    alpha = ((level - start) / (1.0 - start).clamp_min(1e-8)).clamp(0.0, 1.0)
    return (1.0 - alpha) * off_trajectory.float() + alpha * noise.float()


def soar_correction_velocity(state: Tensor, clean: Tensor, sigma: Tensor) -> Tensor:
    """The velocity whose one-step clean estimate from ``z'`` is exactly ``z0`` (code, step 4)::

        v_corr = (z' − z0) / s'        so that  z' − s'·v_corr = z0

    With ``ẑ_{s1} = z_{s1} + δ`` this is ``(z1 − z0) + (1 − s')/((1 − s1)·s')·δ``: the flow-matching target plus a
    term that cancels the one-step drift (our algebra)."""
    return (state.float() - clean.float()) / _col(sigma, state)


def soar_loss(main_mse: Tensor, aux_mse: Tensor, *, lambda_aux: float = 1.0, count: Tensor | None = None) -> Tensor:
    """SOAR's combined loss, normalised per supervision point (code, step 5)::

        L = (Σ_b ℓ_main,b + λ·Σ_p ℓ_aux,p) / (B + λ·P)

    ``main_mse``: ``(B,)`` flow-matching MSE at the on-trajectory states (the SFT term); ``aux_mse``: ``(P,)`` MSE at
    the auxiliary points against :func:`soar_correction_velocity`. ``count`` overrides the normaliser ``B + λ·P``
    (the trainer passes the all-reduced count times ``1 / world_size`` so that DDP's gradient average gives the code's
    global normalisation). With ``λ = 0`` this is ``mean(main_mse)``, the SFT loss.
    """
    if main_mse.ndim != 1 or aux_mse.ndim != 1:
        raise ValueError(f"soar_loss: main_mse {tuple(main_mse.shape)} and aux_mse {tuple(aux_mse.shape)} must be 1-D")
    if lambda_aux < 0:
        raise ValueError(f"soar_loss: lambda_aux={lambda_aux} must be >= 0")
    total = main_mse.sum() + lambda_aux * aux_mse.sum()
    if count is None:
        count = torch.tensor(main_mse.numel() + lambda_aux * aux_mse.numel(), device=main_mse.device)
    return total / count
