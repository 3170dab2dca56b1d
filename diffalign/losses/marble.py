"""MARBLE (Multi-Aspect Reward BaLancE; Zhao et al. 2026, arXiv 2605.06507): the tensor math of balancing several
rewards in gradient space instead of summing them.

The paper's recipe, as implemented here (its training code is not released; the formulas follow the paper text):

1. one advantage estimator per reward (:func:`per_reward_advantages`), so a sample only gets credit on the rewards
   that speak about it (most rollouts are "specialist" samples, informative for some rewards only);
2. one policy gradient ``g_k`` per reward, normalised to ``ĝ_k = g_k / ||g_k||``, harmonised by the min-norm
   quadratic program of MGDA (Désidéri 2012; Sener & Koltun 2018) on ``G = ĜĜᵀ`` (:func:`min_norm_coefficients`),
   and rescaled to the mean gradient norm (:func:`marble_weights`);
3. the amortised form: DiffusionNFT's loss is affine in the advantage, so the step with coefficients ``α`` is one
   backward pass of the blended advantage ``Σ_k α_k A_k`` (:func:`blend_advantages`), with EMA-smoothed coefficients
   (:func:`smooth_coefficients`);
4. the diagnostic: each reward's gradient cosine with the update taken (:func:`gradient_cosines`).

Ours (not in the paper): NaN rewards as "does not apply", the optional floor on the coefficients, excluding zero or
non-finite gradients, the exact solver of the program, and blending with the *smoothed* coefficients. The trainer
side (per-reward gradients with ``autograd.grad``, when to solve) is ``diffalign.trainers.reward_balance``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from diffalign.losses.nft import nft_advantages
from diffalign.losses.types import check_positive, check_shape

F64 = torch.float64


def per_reward_advantages(
    rewards: Tensor, group_ids: Tensor | None = None, *, global_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """One DiffusionNFT advantage estimator per reward, ``(N, K)`` from ``rewards`` ``(N, K)``::

        A[:, k] = nft_advantages(R[:, k], group_ids)       over the samples where R[:, k] is not NaN
        A[i, k] = 0                                        where R[i, k] is NaN

    The paper keeps "independent advantage estimators for each reward" (each column is normalised on its own, so a
    reward's scale does not matter). Ours: a NaN entry means the reward does not apply to that sample (a specialist
    prompt, see ``diffalign.rewards.specialist``); column ``k``'s group means and std (global or per group, as in
    :func:`~diffalign.losses.nft.nft_advantages`, ``eps = 1e-4``) are taken over its non-NaN entries only, and a
    column that is all NaN gives zeros. ``±inf`` rewards are an error. ``group_ids``: ``(N,)`` integer prompt ids,
    ``None`` for one group.
    """
    fn = "per_reward_advantages"
    check_shape(fn, ("N", "K"), rewards=rewards)
    check_positive(fn, eps=eps)
    if torch.isinf(rewards).any():
        raise ValueError(f"losses.{fn}: `rewards` has ±inf entries; use NaN for a reward that does not apply.")
    if group_ids is not None:
        check_shape(fn, ("N",), floating=False, group_ids=group_ids)
        if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
            raise TypeError(f"losses.{fn}: `group_ids` has dtype {group_ids.dtype}; pass integer prompt ids.")
        _check_one_per(fn, "group_ids", group_ids, "id", "rewards", rewards, dim=0)
    out = torch.zeros(rewards.shape, dtype=torch.promote_types(rewards.dtype, torch.float32), device=rewards.device)
    for k in range(rewards.shape[1]):
        present = ~torch.isnan(rewards[:, k])
        if present.any():
            ids = None if group_ids is None else group_ids[present]
            out[present, k] = nft_advantages(rewards[present, k], ids, global_std=global_std, eps=eps)
    return out


def _check_one_per(fn: str, name: str, vector: Tensor, item: str, of: str, matrix: Tensor, *, dim: int) -> None:
    """``vector`` must hold one ``item`` per row (``dim=0``) or column (``dim=1``) of ``matrix``, on its device."""
    if vector.shape[0] != matrix.shape[dim] or vector.device != matrix.device:
        raise ValueError(
            f"losses.{fn}: `{name}` has shape {tuple(vector.shape)} on {vector.device}; pass one {item} per "
            f"{('row', 'column')[dim]} of `{of}` ({matrix.shape[dim]},) on {matrix.device}."
        )


def _check_floor(fn: str, floor: float, k: int) -> None:
    ok = isinstance(floor, numbers.Real) and not isinstance(floor, bool) and math.isfinite(floor) and floor >= 0
    if not ok or floor * k > 1 + 1e-12:
        raise ValueError(f"losses.{fn}: `floor` must be a number in [0, 1/K] = [0, {1 / k:.6g}], got {floor!r}.")


def project_to_simplex(v: Tensor, floor: float = 0.0) -> Tensor:
    """Euclidean projection of ``v`` ``(K,)`` onto the floored simplex ``{α : Σ_k α_k = 1, α_k ≥ floor}``::

        α = floor + max(v − floor − θ, 0)      with θ such that Σ_k α_k = 1

    ``θ`` by the sort-based rule of Duchi et al. 2008 ("Efficient projections onto the l1-ball for learning in high
    dimensions") applied to ``v − floor`` and the radius ``1 − K·floor``. ``floor·K`` must be ``<= 1`` (``= 1`` gives
    ``α_k = floor``). Also the final clean-up of :func:`min_norm_coefficients` (removes rounding off the simplex).
    """
    fn = "project_to_simplex"
    check_shape(fn, ("K",), v=v)
    k = v.shape[0]
    _check_floor(fn, floor, k)
    radius = max(1.0 - k * floor, 0.0)
    if radius == 0.0:
        return torch.full_like(v, floor)
    shifted = v - floor
    u = torch.sort(shifted, descending=True).values
    excess = torch.cumsum(u, 0) - radius
    ranks = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    last = int(torch.nonzero(u - excess / ranks > 0).max())  # index 0 always qualifies (radius > 0)
    theta = excess[last] / (last + 1)
    return floor + (shifted - theta).clamp_min(0.0)


def min_norm_coefficients(gram: Tensor, *, floor: float = 0.0, iters: int = 500, tol: float = 1e-10) -> Tensor:
    """The MGDA quadratic program on a Gram matrix ``G = [g_i·g_j]`` ``(K, K)``, float64 ``(K,)``::

        α* = argmin_α ½ αᵀ G α      s.t.  Σ_k α_k = 1,  α_k ≥ floor

    so ``Σ_k α*_k g_k`` is the shortest point of the (floored) convex hull of the ``g_k``. ``floor = 0`` is MGDA
    (Désidéri 2012; Sener & Koltun 2018), the program MARBLE solves on its normalised gradients; ``floor > 0``
    (ours; ``floor·K <= 1``) keeps every reward in the update. At the optimum (KKT) ``(Gα*)_k = λ`` where
    ``α*_k > floor`` and ``(Gα*)_k ≥ λ`` elsewhere; with ``floor = 0``, ``λ = α*ᵀGα*``, so every ``g_k`` has an
    inner product ``≥ ||Σ α*_k g_k||²`` with the combined direction.

    Solver (ours): Wolfe's nearest-point algorithm (Wolfe 1976, "Finding the nearest point in a polytope"), written
    on the Gram matrix. It keeps an affinely independent set of active points, and solves the program exactly on it
    (a ``(|S|+1)``-square linear system) in finitely many steps; ``iters`` caps its outer steps and it stops when
    the Frank–Wolfe gap ``αᵀGα − min_k (Gα)_k`` is at most ``tol·max_k G_kk``. A floor is the substitution
    ``α = floor + (1 − K·floor)·β`` with ``β`` on the plain simplex, i.e. the same program on ``MGM`` with
    ``M = floor·11ᵀ + (1 − K·floor)·I``. (Projected gradient with step ``1/λ_max`` was measured to leave KKT errors up
    to ``1e-3`` after 500 steps on rank-deficient Grams.) When several ``α`` reach the minimum (e.g. duplicated
    gradients) one of them is returned; ``G = 0`` returns the uniform point. ``G`` must be positive semi-definite
    (checked up to ``1e-4·λ_max``, so float32 rounding passes). Computed in float64 on the CPU; returned on
    ``gram``'s device.
    """
    fn = "min_norm_coefficients"
    check_shape(fn, ("K", "K"), gram=gram)
    k = gram.shape[0]
    if gram.shape[1] != k:
        raise ValueError(f"losses.{fn}: `gram` has shape {tuple(gram.shape)}; pass a square (K, K) Gram matrix.")
    if not torch.isfinite(gram).all():
        raise ValueError(f"losses.{fn}: `gram` has non-finite entries; drop the rewards whose gradient is not finite.")
    _check_floor(fn, floor, k)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"losses.{fn}: `iters` must be an int >= 1, got {iters!r}.")
    check_positive(fn, tol=tol)
    g = gram.detach().to("cpu", F64)  # K is small: solve on the CPU, no device syncs per step
    g = (g + g.T) / 2
    eig = torch.linalg.eigvalsh(g)
    if float(eig[0]) < -1e-4 * max(float(eig[-1]), 0.0):
        raise ValueError(
            f"losses.{fn}: `gram` is not positive semi-definite (eigenvalues {eig.tolist()}); pass G_ij = g_i·g_j."
        )
    scale = 1.0 - k * floor
    if k == 1 or scale <= 0.0 or float(g.abs().max()) == 0.0:
        return project_to_simplex(torch.full((k,), 1.0 / k, dtype=F64), floor).to(gram.device)
    m = floor * torch.ones(k, k, dtype=F64) + scale * torch.eye(k, dtype=F64)
    beta = _nearest_point(m @ g @ m, iters, tol)
    return project_to_simplex(floor + scale * beta, floor).to(gram.device)


def _nearest_point(g: Tensor, iters: int, tol: float) -> Tensor:
    """Wolfe's algorithm on Gram ``g``: the simplex weights ``β`` of the shortest point ``x = Σ_k β_k p_k`` of the
    hull of points ``p_k`` with ``p_i·p_j = g_ij``. In Gram terms ``x·p_j = (gβ)_j`` and ``x·x = βᵀgβ``."""
    k = g.shape[0]
    gap_tol = tol * float(g.diagonal().max())
    active = [int(g.diagonal().argmin())]
    weights = torch.ones(1, dtype=F64)
    for _ in range(iters):
        along = g[:, active] @ weights  # x·p_j for every j
        j = int(along.argmin())
        if float(weights @ along[active]) - float(along[j]) <= gap_tol or j in active:
            break
        active.append(j)
        weights = torch.cat([weights, weights.new_zeros(1)])
        while True:  # minor cycle: move to the affine minimiser of the active points, dropping those it leaves
            target = _affine_minimiser(g[active][:, active])
            if bool((target > 0).all()):
                weights = target
                break
            shrinking = target <= 0
            ratios = weights[shrinking] / (weights[shrinking] - target[shrinking])
            theta = float(ratios.min().clamp(0.0, 1.0))
            weights = (1 - theta) * weights + theta * target
            drop = torch.zeros_like(shrinking)
            drop[torch.nonzero(shrinking).squeeze(1)[ratios.argmin()]] = True
            keep = ~(drop | (weights <= 0))
            active = [a for a, kept in zip(active, keep.tolist(), strict=True) if kept]
            weights = weights[keep] / weights[keep].sum()
    beta = torch.zeros(k, dtype=F64)
    beta[active] = weights
    return beta


def _affine_minimiser(g: Tensor) -> Tensor:
    """Weights ``μ`` (``Σ μ = 1``) of the shortest point of the affine hull: ``[g 1; 1ᵀ 0]·[μ; ν] = [0; 1]``."""
    n = g.shape[0]
    system = torch.ones(n + 1, n + 1, dtype=F64)
    system[:n, :n] = g
    system[n, n] = 0.0
    rhs = torch.zeros(n + 1, 1, dtype=F64)
    rhs[n] = 1.0
    return torch.linalg.lstsq(system, rhs).solution[:n, 0]


@dataclass
class MarbleStep:
    """One MARBLE solve over ``K`` per-reward gradients of ``P`` parameters.

    Attributes:
        alpha: ``(K,)`` float64 min-norm coefficients of the normalised gradients (0 for excluded rewards).
        weights: ``(K,)`` float64 ``w_k`` with ``direction = Σ_k w_k g_k``: the weights of ``Σ_k w_k L_k``, whose
            single backward pass gives the balanced update.
        norms: ``(K,)`` ``||g_k||`` (non-finite for a non-finite gradient).
        direction: ``(P,)`` the combined update ``d``.
        cosines: ``(K,)`` ``cos(g_k, d)`` (0 for excluded rewards).
    """

    alpha: Tensor
    weights: Tensor
    norms: Tensor
    direction: Tensor
    cosines: Tensor


def marble_weights(grads: Tensor, *, floor: float = 0.0) -> MarbleStep:
    """MARBLE's balanced update from per-reward gradients ``grads`` ``(K, P)`` (row ``k`` = ``g_k = ∇L_k``)::

        n_k = ||g_k||,   ĝ_k = g_k / n_k,   G = Ĝ Ĝᵀ
        α   = min_norm_coefficients(G, floor)
        d   = (Σ_k α_k ĝ_k) · mean_k n_k  =  Σ_k w_k g_k,      w_k = α_k · mean(n) / n_k

    Paper: per-reward policy gradients, normalised so that no reward dominates by scale, harmonised by the min-norm
    quadratic program, and the combined direction given the mean gradient norm back. With ``floor = 0`` every
    ``cos(g_k, d) > 0`` unless the normalised gradients' hull contains 0 (then ``d = 0``): the update improves every
    reward to first order. Ours: rewards with ``n_k = 0`` or a non-finite gradient are left out (``α_k = w_k = 0``;
    ``mean(n)`` is over the others); if none is left, ``α`` is uniform and the weights and ``d`` are zero. ``floor``
    as in :func:`min_norm_coefficients`. The Gram matrix is formed in ``grads``' precision (at least float32), the
    program is solved in float64.
    """
    fn = "marble_weights"
    check_shape(fn, ("K", "P"), grads=grads)
    k = grads.shape[0]
    _check_floor(fn, floor, k)
    values = grads.to(torch.promote_types(grads.dtype, torch.float32))
    norms = values.norm(dim=1)
    valid = torch.isfinite(values).all(dim=1) & (norms > 0)
    alpha = torch.zeros(k, dtype=F64, device=values.device)
    weights = torch.zeros(k, dtype=F64, device=values.device)
    if not valid.any():
        alpha.fill_(1.0 / k)
        return MarbleStep(alpha, weights, norms, values.new_zeros(values.shape[1]), values.new_zeros(k))
    rows = values if bool(valid.all()) else values[valid]
    n = norms[valid].to(F64)
    gram = (rows @ rows.T).to(F64) / (n[:, None] * n[None, :])
    alpha[valid] = min_norm_coefficients(gram, floor=floor)
    weights[valid] = alpha[valid] * n.mean() / n
    direction = weights[valid].to(rows.dtype) @ rows
    cosines = torch.where(valid, gradient_cosines(values.nan_to_num(0.0, 0.0, 0.0), direction), 0.0)
    return MarbleStep(alpha, weights, norms, direction, cosines)


def gradient_cosines(grads: Tensor, update: Tensor) -> Tensor:
    """Each reward's gradient cosine with an update, ``(K,)``::

        cos_k = g_k · u / (||g_k|| · ||u||)         (0 where ||g_k|| = 0 or ||u|| = 0)

    The paper's diagnostic: under a weighted-sum reward the worst reward's cosine with the update is negative in
    most mini-batches (that reward gets worse), under MARBLE it stays positive. ``grads`` ``(K, P)``, ``update``
    ``(P,)``; computed in their precision (at least float32).
    """
    fn = "gradient_cosines"
    check_shape(fn, ("K", "P"), grads=grads)
    check_shape(fn, ("P",), update=update)
    _check_one_per(fn, "update", update, "value", "grads", grads, dim=1)
    dtype = torch.promote_types(torch.promote_types(grads.dtype, update.dtype), torch.float32)
    g, u = grads.to(dtype), update.to(dtype)
    denom = g.norm(dim=1) * u.norm()
    return torch.where(denom > 0, (g @ u) / torch.where(denom > 0, denom, 1.0), 0.0)


def smooth_coefficients(previous: Tensor | None, new: Tensor, rho: float = 0.7) -> Tensor:
    """EMA of the balancing coefficients: ``α ← ρ·α_prev + (1 − ρ)·α_new`` (``previous=None`` returns ``new``).

    Paper: smoothing the coefficients across solves keeps one noisy mini-batch from swinging the update; ``ρ = 0.7``
    is its decay, and the paper ablates ``ρ``. ``ρ`` in ``[0, 1)`` (``0`` = no smoothing). A convex combination of two
    points of the simplex stays on it. The result has ``new``'s dtype and device.
    """
    fn = "smooth_coefficients"
    check_shape(fn, ("K",), new=new)
    ok = isinstance(rho, numbers.Real) and not isinstance(rho, bool) and 0.0 <= rho < 1.0
    if not ok:
        raise ValueError(f"losses.{fn}: `rho` must be a number in [0, 1), got {rho!r}.")
    if previous is None:
        return new.clone()
    check_shape(fn, ("K",), previous=previous)
    if previous.shape != new.shape:
        raise ValueError(
            f"losses.{fn}: `previous` has shape {tuple(previous.shape)} but `new` has {tuple(new.shape)}; pass one "
            "coefficient per reward in both."
        )
    return rho * previous.to(new) + (1.0 - rho) * new


def blend_advantages(advantages: Tensor, alpha: Tensor) -> Tensor:
    """The amortised MARBLE advantage ``A = Σ_k α_k A_k``: ``(N,)`` from ``advantages`` ``(N, K)``, ``alpha`` ``(K,)``.

    Why one backward pass suffices (paper's amortised MGDA): DiffusionNFT's per-sample loss
    ``s·(r·ℓ⁺ + (1 − r)·ℓ⁻)/β`` is affine in ``r = A/(2c) + 1/2`` (before ``r``'s clip; ``ℓ±`` do not depend on
    ``r``), so with ``Σ_k α_k = 1`` the loss of the blended advantage equals ``Σ_k α_k L(A_k)`` and its gradient
    ``Σ_k α_k g_k`` — one backward pass instead of ``K + 1``. Exact while no ``|A_k|`` exceeds the clip ``c``.
    Ours: the trainer blends with the smoothed ``α`` of :func:`smooth_coefficients`; note that this weights the raw
    per-reward gradients, whereas the full step of :func:`marble_weights` weights the normalised ones
    (``w_k = α_k·mean(n)/n_k``), so the two steps agree in direction only when the gradient norms are equal.
    Computed in the promoted dtype of both inputs (at least float32).
    """
    fn = "blend_advantages"
    check_shape(fn, ("N", "K"), advantages=advantages)
    check_shape(fn, ("K",), alpha=alpha)
    _check_one_per(fn, "alpha", alpha, "coefficient", "advantages", advantages, dim=1)
    dtype = torch.promote_types(torch.promote_types(advantages.dtype, alpha.dtype), torch.float32)
    return advantages.to(dtype) @ alpha.to(dtype)
