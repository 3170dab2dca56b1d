"""Group-relative advantages for online RL (GRPO, RLOO, MC-GRPO, BNPO) and small rank / best-of-K helpers.

Layout convention (TRL's and flow_grpo's): ``rewards`` is ``(N,)`` with ``N = n_prompts · G`` and the ``G``
completions / images of one prompt **contiguous** (``rewards.view(-1, G)`` is one row per prompt). All functions are
pure and run under ``torch.no_grad`` semantics (rewards carry no gradient); outputs are ``(N,)`` unless stated.
"""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]
_SCALE: tuple[str, ...] = ("group", "batch", "none")


def _groups(fn: str, rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"advantages.{fn}: `rewards` must be a floating (N,) tensor.")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"advantages.{fn}: `num_generations` must be an int >= 1, got {num_generations!r}.")
    if rewards.numel() % num_generations != 0:
        raise ValueError(
            f"advantages.{fn}: {rewards.numel()} rewards are not a whole number of groups of {num_generations}."
        )
    return rewards.view(-1, num_generations)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False, unbiased: bool = True) -> torch.Tensor:
    """NaN-ignoring std; ``unbiased=True`` is ``trl.trainer.utils.nanstd`` (Bessel, NaN for < 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    if unbiased:
        count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
        corr = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
        var = var * corr
    std = torch.sqrt(var)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO advantages: ``A = (R − mean_group(R)) / (std + eps)``.

    ``scale_rewards``: ``"group"`` (TRL default) std within the prompt's group; ``"batch"`` std over all ``N``
    rewards (the mean stays per group); ``"none"`` no division (Dr. GRPO). NaN rewards (unscorable) are left out of
    means / stds and get advantage 0; every NaN advantage is set to 0 (TRL: ``nan_to_num``). With ``G = 1`` /
    ``N = 1`` the std is taken as 0, as in TRL.

    ``unbiased=True`` (TRL, ``nanstd`` with Bessel's correction) vs ``unbiased=False`` (population std:
    flow_grpo's ``np.std``; flow_grpo's ``global_std=True`` is ``scale_rewards="batch"``). Both use ``eps = 1e-4``.
    Source: TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` (``sum_then_normalize``); flow_grpo
    ``PerPromptStatTracker`` (``flow_grpo/stat_tracking.py``).
    """
    if scale_rewards not in _SCALE:
        raise ValueError(f"advantages.group_advantages: scale_rewards must be one of {_SCALE}, got {scale_rewards!r}.")
    grouped = _groups("group_advantages", rewards, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    adv = rewards - mean
    if scale_rewards == "group":
        if num_generations > 1:
            std = nanstd(grouped, dim=1, keepdim=True, unbiased=unbiased).expand_as(grouped).reshape(-1)
        else:
            std = torch.zeros_like(rewards)
        adv = adv / (std + eps)
    elif scale_rewards == "batch":
        std = (
            nanstd(rewards, unbiased=unbiased)
            if rewards.numel() > 1
            else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        )
        adv = adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO leave-one-out baseline: ``A_i = R_i − (Σ_{j≠i} R_j)/(G − 1)`` within each group (sums to 0 per group).

    Equals ``G/(G−1)·(R_i − mean_group R)``. TRL's ``RLOOTrainer`` subtracts the KL penalty from ``R`` first
    (``R ← R − β Σ_t (log π_old − log π_ref)``) and optionally whitens over the batch; do those outside.
    Source: Ahmadian et al. 2024 (arXiv 2402.14740); TRL 1.16 ``RLOOTrainer``.
    """
    grouped = _groups("rloo_advantages", rewards, num_generations)
    if num_generations < 2:
        raise ValueError("advantages.rloo_advantages: the leave-one-out baseline needs num_generations >= 2.")
    total = grouped.sum(dim=1, keepdim=True)
    baseline = (total - grouped) / (num_generations - 1)
    return (grouped - baseline).reshape(-1)


def mc_grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    mad_eps: float = 1e-3,
    zero_tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MC-GRPO median-centred advantages on groups of ``group_size = G + 1`` rollouts.

    Per group: ``m = median(r)`` (``torch.median``: the lower median, exact for odd ``G+1``; its index is the
    *pivot*), ``MAD = median_i |r_i − m| + mad_eps``, ``A_i = (r_i − m)/MAD`` (no std scaling); then the non-zero
    advantages (``|A_i| > zero_tol``) are multiplied by ``(G+1)/n_nonzero``; the pivot rollout is dropped so that
    ``G`` samples per prompt carry gradient.

    Returns ``(advantages, keep)``: ``(N,)`` advantages (the pivot's is 0) and a ``(N,)`` bool mask that is False
    exactly at each group's pivot; train on ``advantages[keep]`` with any GRPO-family loss. With ties the pivot is
    whichever index ``torch.median`` returns (as in the authors' code). Not covered: the ablation ``mc=False``
    (mean baseline, drop the sample with the smallest ``|r|``).
    Source: ``lotusroot-kim/MC-GRPO`` ``src/open_r1/grpo_trainer_gsm.py`` (flag ``mc=True``), arXiv 2601.22582
    (``_generate_and_score_completions``).
    """
    grouped = _groups("mc_grpo_advantages", rewards, group_size)
    med, pivot = torch.median(grouped, dim=1, keepdim=True)
    mad = torch.median((grouped - med).abs(), dim=1, keepdim=True).values + mad_eps
    adv = (grouped - med) / mad
    nonzero = adv.abs() > zero_tol
    n_nz = nonzero.sum(dim=1, keepdim=True)
    scale = torch.where(n_nz > 0, group_size / n_nz.clamp(min=1).to(adv.dtype), torch.ones_like(mad))
    adv = torch.where(nonzero, adv * scale, adv)
    keep = torch.ones_like(grouped, dtype=torch.bool)
    keep.scatter_(1, pivot, False)
    return adv.reshape(-1), keep.reshape(-1)


def _beta_pdf(p: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Beta(α, β) density at ``p`` (``xlogy`` so that ``0·log 0 = 0``, like ``torch.distributions.Beta``)."""
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    return torch.exp(torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm)


def bnpo_beta_params(group_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BNPO's normaliser parameters ``(α, β)`` from the per-prompt success rates ``p̂`` (``(n_prompts,)``).

    ``μ = mean(p̂)``, ``v = var(p̂)`` (unbiased; ``μ = 0, v = 1`` with a single prompt), method of moments
    ``a = (μ(1−μ)/v − 1)·μ``, ``b = (μ(1−μ)/v − 1)·(1−μ)``, then ``α = max(1 + a/3, 1)``, ``β = max(1 + b/3, 1)``.
    A batch whose ``p̂`` are all equal (``v = 0``) gives infinite / NaN parameters, exactly as the reference code.
    """
    if group_means.numel() > 1:
        mu, var = group_means.mean(), group_means.var()
    else:
        mu = torch.zeros((), dtype=group_means.dtype, device=group_means.device)
        var = torch.ones((), dtype=group_means.dtype, device=group_means.device)
    k = mu * (1 - mu) / var - 1
    a, b = k * mu, k * (1 - mu)
    return torch.clamp(1 + a / 3, min=1.0), torch.clamp(1 + b / 3, min=1.0)


def bnpo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    max_weight: float = 1e6,
) -> torch.Tensor:
    """BNPO (Beta Normalization Policy Optimization) advantages.

    ``s = (R − reward_min)/(reward_max − reward_min)`` must lie in [0, 1]; per prompt ``p̂ = mean_group(s)`` (0 for a
    group of one); ``(α, β)`` from :func:`bnpo_beta_params` over the batch's ``p̂``;
    ``A_i = min(1/f_Beta(p̂; α, β), max_weight) · (s_i − p̂)``. ``α = β = 1`` is REINFORCE-with-baseline,
    ``α = β = 3/2`` gives ``∝ (s − p̂)/√(p̂(1−p̂))`` (GRPO's Bernoulli std).

    ``rewards`` ``(N, K)`` = K reward components: "advantage decomposition" — each component is normalised with its
    own ``(α, β)`` and the K advantages are **averaged** (the authors' code divides by the
    count; a summary of the paper says "sum").
    Source: ``changyi7231/BNPO`` ``recipe/bnpo/src/bnpo_ray_trainer.py`` (``compute_bnpo_outcome_advantage`` and
    ``use_advantage_decomposition``), arXiv 2506.02864. Not TRL's ``loss_type="bnpo"`` (an aggregation).
    """
    if rewards.dim() == 2:
        comps = [
            bnpo_advantages(
                rewards[:, k], num_generations, reward_min=reward_min, reward_max=reward_max, max_weight=max_weight
            )
            for k in range(rewards.shape[1])
        ]
        return torch.stack(comps, dim=0).mean(dim=0)
    if not reward_max > reward_min:
        raise ValueError("advantages.bnpo_advantages: reward_max must be > reward_min.")
    s = (rewards - reward_min) / (reward_max - reward_min)
    grouped = _groups("bnpo_advantages", s, num_generations)
    if ((s < 0) | (s > 1)).any():
        raise ValueError(
            "advantages.bnpo_advantages: rewards fall outside [reward_min, reward_max]; adjust them so that the "
            "per-prompt success rate p lies in [0, 1]."
        )
    if num_generations > 1:
        p = grouped.mean(dim=1)
    else:
        p = torch.zeros(grouped.shape[0], dtype=s.dtype, device=s.device)
    alpha, beta = bnpo_beta_params(p)
    weight = torch.clamp(1.0 / _beta_pdf(p, alpha, beta), min=0.0, max=max_weight)
    return (weight.unsqueeze(1) * (grouped - p.unsqueeze(1))).reshape(-1)


def group_ranks(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Rank of each reward within its group, ``0`` = lowest, ``G−1`` = highest (ties broken by position)."""
    grouped = _groups("group_ranks", rewards, num_generations)
    order = torch.argsort(grouped, dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).reshape(-1)


def best_of_k_mask(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Bool ``(N,)`` mask, True at each group's argmax (RAFT; flow_grpo ``'sft'`` tracker: advantage 1 there)."""
    grouped = _groups("best_of_k_mask", rewards, num_generations)
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(1, grouped.argmax(dim=1, keepdim=True), True)
    return mask.reshape(-1)


def best_worst_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """flow_grpo ``'dpo'`` tracker: +1 at each group's argmax, −1 at its argmin, 0 elsewhere (needs ``G >= 2``)."""
    grouped = _groups("best_worst_advantages", rewards, num_generations)
    if num_generations < 2:
        raise ValueError("advantages.best_worst_advantages: needs num_generations >= 2.")
    adv = torch.zeros_like(grouped)
    adv.scatter_(1, grouped.argmin(dim=1, keepdim=True), -1.0)
    adv.scatter_(1, grouped.argmax(dim=1, keepdim=True), 1.0)
    return adv.reshape(-1)


ADVANTAGE_METHODS: tuple[str, ...] = ("group", "batch", "none", "rloo", "mc_grpo", "bnpo", "best_of_k")


def samples_per_prompt(method: str, num_generations: int) -> int:
    """Rollouts to draw per prompt: MC-GRPO draws one more (its median pivot, dropped from training)."""
    return num_generations + 1 if method == "mc_grpo" else num_generations


def compute_advantages(rewards: torch.Tensor, method: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, keep)`` for a config's advantage name, over groups of ``group_size`` contiguous rollouts.

    ``group`` / ``batch`` / ``none``: :func:`group_advantages` with that ``scale_rewards``; ``rloo``:
    :func:`rloo_advantages`; ``mc_grpo``: :func:`mc_grpo_advantages` (``keep`` drops the pivots); ``bnpo``:
    :func:`bnpo_advantages` on rewards in [0, 1]; ``best_of_k``: 1 at each group's best rollout and 0 elsewhere
    (RAFT / online SFT on the best of K through the policy loss). ``keep`` is all True except for MC-GRPO. Call it
    on the rewards of the whole (gathered) batch: ``batch`` and ``bnpo`` use batch statistics."""
    keep = torch.ones_like(rewards, dtype=torch.bool)
    if method in _SCALE:
        return group_advantages(rewards, group_size, scale_rewards=method), keep  # type: ignore[arg-type]
    if method == "rloo":
        return rloo_advantages(rewards, group_size), keep
    if method == "mc_grpo":
        return mc_grpo_advantages(rewards, group_size)
    if method == "bnpo":
        return bnpo_advantages(rewards, group_size), keep
    if method == "best_of_k":
        return best_of_k_mask(rewards, group_size).to(rewards.dtype), keep
    raise ValueError(f"advantages.compute_advantages: method must be one of {ADVANTAGE_METHODS}, got {method!r}.")


__all__ = [
    "ADVANTAGE_METHODS",
    "compute_advantages",
    "samples_per_prompt",
    "best_of_k_mask",
    "best_worst_advantages",
    "bnpo_advantages",
    "bnpo_beta_params",
    "group_advantages",
    "group_ranks",
    "mc_grpo_advantages",
    "nanstd",
    "rloo_advantages",
]
