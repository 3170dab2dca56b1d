"""DiffusionNFT (Diffusion Negative-aware FineTuning; arXiv 2509.16117, official code ``NVlabs/DiffusionNFT``): the
tensor parts of the objective.

DiffusionNFT trains on the *forward* process: clean images sampled by the old policy are noised again and the
velocity is regressed with flow matching, but through two *implicit* policies built from the trained velocity ``v_θ``
and the old (sampling) policy's velocity ``v_old``::

    v⁺ = β·v_θ + (1 − β)·v_old          (implicit positive policy)
    v⁻ = (1 + β)·v_old − β·v_θ          (implicit negative policy; v⁺ + v⁻ = 2·v_old)

Each sample pulls ``v⁺`` toward the flow-matching target with weight ``r`` (its optimality probability, from the
rewards) and ``v⁻`` with weight ``1 − r``. Paper §3 (the negative-aware objective); the code is
``scripts/train_nft_sd3.py`` ``main`` (training loop) and ``return_decay``, defaults from ``config/base.py`` and
``config/nft.py`` (repository snapshot of 2025-09-22, commit ``24af555``).

Flow coordinates as in SD3: ``x_t = (1 − σ)·x0 + σ·ε`` and the target velocity ``v = ε − x0``, so the one-step clean
estimate of a velocity ``u`` is ``x̂0 = x_t − σ·u`` and ``x̂0 − x0 = σ·(v − u)``.

The trainer, config keys and the old-policy parameter copy are not here; :func:`old_policy_decay` gives the decay the
trainer applies once per epoch (``old ← decay·old + (1 − decay)·current``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffalign.losses.policy import PolicyLossOutput
from diffalign.losses.types import check_positive, check_shape

AdvantageMode = Literal["all", "positive_only", "negative_only", "one_only", "binary"]
_ADV_MODES: tuple[str, ...] = ("all", "positive_only", "negative_only", "one_only", "binary")

#: Old-policy decay schedules of the official ``return_decay``: ``schedule -> (flat, rate, cap)``; the decay is 0 for
#: the first ``flat`` steps, then ``min((step − flat)·rate, cap)``. ``1`` is the ``config/nft.py`` default, ``2`` its
#: ``sd3_ocr`` config, ``0`` copies the current policy every epoch (no averaging).
OLD_POLICY_DECAY_SCHEDULES: dict[int, tuple[int, float, float]] = {
    0: (0, 0.0, 0.0),
    1: (0, 0.001, 0.5),
    2: (75, 0.0075, 0.999),
}


def _col(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def nft_advantages(
    rewards: Tensor, group_ids: Tensor | None = None, *, global_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """Per-prompt reward advantages as DiffusionNFT computes them before turning them into ``r``::

        A_i = (R_i − mean_{j: g_j = g_i} R_j) / (std + eps)

    ``group_ids``: ``(N,)`` integer prompt id per sample (samples of one prompt need not be contiguous); ``None``
    treats the whole batch as one group. ``std`` is the population std (numpy's ``np.std``) of *all* ``N`` rewards
    when ``global_std`` (default, ``config/base.py`` ``sample.global_std = True``) or of the sample's group
    otherwise. ``eps = 1e-4`` as in the code. Source: ``flow_grpo/stat_tracking.py`` ``PerPromptStatTracker.update``
    (the tracker ``train_nft_sd3.py`` uses; the code's batch-wise branch is unreachable there, as its setup requires
    per-prompt tracking). The trainer must pass the rewards of all processes (the code gathers them first).
    """
    fn = "nft_advantages"
    check_shape(fn, ("N",), rewards=rewards)
    check_positive(fn, eps=eps)
    values = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    if group_ids is None:
        group_ids = torch.zeros(values.shape[0], dtype=torch.long, device=values.device)
    check_shape(fn, ("N",), floating=False, rewards=rewards, group_ids=group_ids)
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise TypeError(f"losses.{fn}: `group_ids` has dtype {group_ids.dtype}; pass integer prompt ids.")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    means = torch.zeros_like(counts).index_add_(0, inverse, values) / counts
    centred = values - means[inverse]
    if global_std:
        std = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
    else:
        var = torch.zeros_like(counts).index_add_(0, inverse, centred**2) / counts
        std = var.sqrt()[inverse]
    return centred / (std + eps)


def optimality_probability(
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    adv_clip_max: float = 5.0,
    adv_mode: AdvantageMode = "all",
    global_std: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """Rewards → optimality probabilities ``r ∈ [0, 1]``, ``(N,)``, the way the official training loop maps them::

        A = clip(nft_advantages(R), −c, c)                 c = adv_clip_max
        r = clip(A / c / 2 + 1/2, 0, 1)                    (A = 0 ↦ r = 1/2; A = ±c ↦ r = 1 / 0)

    ``adv_mode`` reshapes the clipped ``A`` first: ``"all"`` (default, ``config/nft.py``) keeps it;
    ``"positive_only"`` / ``"negative_only"`` clip it to ``[0, c]`` / ``[−c, 0]``; ``"one_only"`` sets it to 1 if
    ``A > 0`` else 0; ``"binary"`` to ``sign(A)``. ``adv_clip_max = 5`` from ``config/base.py``
    (``train.adv_clip_max``). Source: ``scripts/train_nft_sd3.py`` ``main`` (training loop: ``advantages_clip``,
    ``normalized_advantages_clip``); the paper's ``r`` is the optimality probability ``p(o = 1 | x0, c)``.
    """
    adv = nft_advantages(rewards, group_ids, global_std=global_std, eps=eps)
    return probability_from_advantage(adv, adv_clip_max=adv_clip_max, adv_mode=adv_mode)


def probability_from_advantage(
    advantages: Tensor, *, adv_clip_max: float = 5.0, adv_mode: AdvantageMode = "all"
) -> Tensor:
    """The second half of :func:`optimality_probability`, for advantages computed elsewhere (MARBLE's blended
    advantage ``Σ_k α_k A_k``): clip to ``[−c, c]``, reshape by ``adv_mode``, ``r = clip(A / c / 2 + 1/2, 0, 1)``."""
    fn = "probability_from_advantage"
    check_positive(fn, adv_clip_max=adv_clip_max)
    if adv_mode not in _ADV_MODES:
        raise ValueError(f"losses.{fn}: adv_mode must be one of {_ADV_MODES}, got {adv_mode!r}.")
    c = float(adv_clip_max)
    adv = advantages.clamp(-c, c)
    if adv_mode == "positive_only":
        adv = adv.clamp(0.0, c)
    elif adv_mode == "negative_only":
        adv = adv.clamp(-c, 0.0)
    elif adv_mode == "one_only":
        adv = (adv > 0).to(adv.dtype)
    elif adv_mode == "binary":
        adv = torch.sign(adv)
    return (adv / c / 2.0 + 0.5).clamp(0.0, 1.0)


def old_policy_decay(step: int, schedule: int = 1) -> float:
    """Decay of the old (sampling) policy's parameter average after ``step`` optimizer steps::

        decay(step) = 0                                  step < flat
                    = min((step − flat)·rate, cap)       otherwise

    with ``(flat, rate, cap)`` from :data:`OLD_POLICY_DECAY_SCHEDULES` (``schedule`` 1, the default of
    ``config/nft.py`` ``decay_type``: ``(0, 0.001, 0.5)``). The trainer applies it once per epoch, after the
    epoch's optimizer steps: ``θ_old ← decay·θ_old + (1 − decay)·θ``, so early epochs sample from (nearly) the
    current policy and later ones from a slower average. Source: ``scripts/train_nft_sd3.py`` ``return_decay`` and
    the end of each epoch in ``main``. (The code's separate ``EMAModuleWrapper`` with decay 0.9 only feeds
    evaluation and checkpoints, not the old policy.)
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"losses.old_policy_decay: `step` must be an int >= 0, got {step!r}.")
    if schedule not in OLD_POLICY_DECAY_SCHEDULES:
        raise ValueError(
            f"losses.old_policy_decay: schedule must be one of {sorted(OLD_POLICY_DECAY_SCHEDULES)}, got {schedule!r}."
        )
    flat, rate, cap = OLD_POLICY_DECAY_SCHEDULES[schedule]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def _branch_loss(velocity: Tensor, target: Tensor, sigma: Tensor, adaptive: bool, floor: float) -> Tensor:
    """Per-sample regression error of one implicit policy, ``(B,)``."""
    dims = tuple(range(1, velocity.ndim))
    residual = target - velocity
    if not adaptive:
        return (residual**2).mean(dim=dims)
    x0_error = _col(sigma, residual) * residual  # x̂0 − x0
    with torch.no_grad():
        weight = x0_error.double().abs().mean(dim=dims, keepdim=True).clamp_min(floor).to(x0_error.dtype)
    return (x0_error**2 / weight).mean(dim=dims)


def nft_loss(
    velocity: Tensor,
    old_velocity: Tensor,
    target: Tensor,
    r: Tensor,
    sigma: Tensor,
    *,
    beta: float = 1.0,
    adaptive_weighting: bool = True,
    policy_scale: float = 5.0,
    ref_velocity: Tensor | None = None,
    kl_coef: float = 1e-4,
    weight_floor: float = 1e-5,
) -> PolicyLossOutput:
    """DiffusionNFT's negative-aware flow-matching loss at one noise level per sample.

    Inputs: ``velocity`` ``v_θ(x_t)`` (differentiable), ``old_velocity`` ``v_old(x_t)`` (detached here),
    ``target`` ``v = ε − x0``, all ``(B, C, H, W)``; ``r`` the optimality probabilities (:func:`optimality_probability`)
    and ``sigma`` the noise level ``σ ∈ [0, 1]`` of ``x_t`` (the code's ``t = timestep / 1000``), both ``(B,)``.
    Per sample, with ``mean`` over ``C, H, W``::

        v⁺ = β·v_θ + (1 − β)·v_old,   v⁻ = (1 + β)·v_old − β·v_θ
        adaptive_weighting (default, as the code):
            ℓ± = mean(σ²·(v − v±)²) / sg[max(mean|σ·(v − v±)|, 1e-5)]
               = mean((x̂0± − x0)²) / sg[max(mean|x̂0± − x0|, 1e-5)]          (x̂0± = x_t − σ·v±)
        otherwise (the paper's plain velocity objective):
            ℓ± = mean((v± − v)²)
        loss_b = s·(r·ℓ⁺ + (1 − r)·ℓ⁻) / β  +  λ·mean((v_θ − v_ref)²)
        loss   = mean_b loss_b

    ``sg`` stops the gradient (the weight is computed in float64, as the code does). Limits: ``r = 1`` keeps only the
    positive term and ``r = 0`` only the negative one; ``β = 1, r = 1`` is plain flow matching on ``v_θ``. Without
    the weighting, one sample's loss is minimised at ``v_θ = v_old + (2r − 1)/β·(v − v_old)``, so a smaller β means
    a larger step away from the old policy (paper §3: the optimal velocity is ``v_old`` plus a guidance direction
    scaled by ``2/β``), and at ``v_θ = v_old`` the gradient ``2s·(2r − 1)·(v_old − v)/(B·N)`` (``N = C·H·W``) does not
    depend on β.

    Defaults and their sources: ``beta = 1.0`` (``config/nft.py`` ``config.beta``; 0.1 in its ``sd3_ocr`` and
    ``sd3_multi_reward`` configs); ``policy_scale = 5.0`` is ``train.adv_clip_max`` (``config/base.py``), which the
    code multiplies into the policy term; ``kl_coef = 1e-4`` (``train.beta``, ``config/base.py`` and ``config/nft.py``)
    on the squared velocity distance to the frozen reference model ``ref_velocity`` (the code's LoRA-disabled
    prediction); ``weight_floor = 1e-5`` (the code's ``clip(min=0.00001)``). The code always applies the adaptive
    weighting; ``adaptive_weighting=False`` is ours. ``kl_coef > 0`` needs ``ref_velocity``; pass ``kl_coef=0`` to
    drop the term. Source: ``scripts/train_nft_sd3.py`` ``main``, training loop (``positive_prediction``,
    ``implicit_negative_prediction``, ``weight_factor``, ``ori_policy_loss``, ``kl_div_loss``).

    Returns a :class:`~diffalign.losses.policy.PolicyLossOutput`: ``loss`` (scalar), ``per_token_loss`` = ``loss_b``
    ``(B,)``, and detached scalar metrics named as the code logs them: ``policy_loss``, ``unweighted_policy_loss``
    (without ``s``), ``old_deviate`` / ``old_deviate_max`` (mean / max of ``(v_θ − v_old)²``), ``kl_div`` and
    ``old_kl_div`` (when ``ref_velocity`` is given); ours in addition: ``positive_loss``, ``negative_loss``,
    ``r_mean``.
    """
    fn = "nft_loss"
    check_shape(
        fn,
        ("B", "C", "H", "W"),
        velocity=velocity,
        old_velocity=old_velocity,
        target=target,
        ref_velocity=ref_velocity,
    )
    check_shape(fn, ("B",), r=r, sigma=sigma)
    if r.shape[0] != velocity.shape[0] or r.device != velocity.device:
        raise ValueError(
            f"losses.{fn}: `r` and `sigma` have shape {tuple(r.shape)} on {r.device}; pass one value per sample of "
            f"`velocity` ({velocity.shape[0]},) on {velocity.device}."
        )
    check_positive(fn, beta=beta, policy_scale=policy_scale, weight_floor=weight_floor)
    if not kl_coef >= 0:
        raise ValueError(f"losses.{fn}: `kl_coef` must be >= 0, got {kl_coef!r}.")
    if kl_coef > 0 and ref_velocity is None:
        raise ValueError(f"losses.{fn}: kl_coef={kl_coef} needs ref_velocity (B, C, H, W); pass it or kl_coef=0.")

    dtype = torch.promote_types(velocity.dtype, torch.float32)
    v_theta = velocity.to(dtype)
    v_old = old_velocity.detach().to(dtype)
    v_target = target.to(dtype)
    prob = r.detach().to(dtype)
    level = sigma.detach().to(dtype)
    dims = tuple(range(1, v_theta.ndim))

    positive = beta * v_theta + (1.0 - beta) * v_old
    negative = (1.0 + beta) * v_old - beta * v_theta
    positive_loss = _branch_loss(positive, v_target, level, adaptive_weighting, weight_floor)
    negative_loss = _branch_loss(negative, v_target, level, adaptive_weighting, weight_floor)
    unweighted = (prob * positive_loss + (1.0 - prob) * negative_loss) / beta
    per_sample = policy_scale * unweighted

    deviation = (v_theta.detach() - v_old) ** 2
    metrics: dict[str, Tensor] = {
        "policy_loss": per_sample.mean().detach(),
        "unweighted_policy_loss": unweighted.mean().detach(),
        "old_deviate": deviation.mean(),
        "old_deviate_max": deviation.max(),
        "positive_loss": positive_loss.mean().detach(),
        "negative_loss": negative_loss.mean().detach(),
        "r_mean": prob.mean(),
    }
    if ref_velocity is not None:
        v_ref = ref_velocity.detach().to(dtype)
        kl = ((v_theta - v_ref) ** 2).mean(dim=dims)
        per_sample = per_sample + kl_coef * kl
        metrics["kl_div"] = kl.mean().detach()
        metrics["old_kl_div"] = ((v_old - v_ref) ** 2).mean()
    return PolicyLossOutput(loss=per_sample.mean(), per_token_loss=per_sample, metrics=metrics)
