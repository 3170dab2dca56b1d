"""Listwise / multi-negative preference losses: PRO (ranked lists), DMPO and DynamicPO (one chosen, K negatives).

They register with ``kind="listwise"``: a trainer must build ``(B, n)`` / ``(B, K)`` inputs for them, not ``(B,)``
pairs.
Gradients reach the policy inputs only; reference inputs, rewards, logits, metrics and data-dependent weights are
detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffalign.losses.registry import register
from diffalign.losses.types import LossOutput, check_logps, check_positive, check_shape

_PRO_EPS = 1e-10  # inside the log of every stage, as in the authors' compute_loss


@register("pro", needs_reference=False, kind="listwise")
def pro(
    *,
    policy_logps: torch.Tensor,
    lengths: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    sft_weight: float = 2.0,
) -> LossOutput:
    """PRO (Preference Ranking Optimization), per prompt over ``n >= 2`` responses ranked best first.

    ``policy_logps`` ``(B, n)``: summed log-probs, column 0 the best response (also the SFT target), sorted by
    ``rewards`` (``(B, n)``, non-increasing along each row; checked). Scores ``s^k = a^k/|y^k|`` (``lengths``
    ``(B, n)``; ``None`` uses ``s = a``, e.g. diffusion). With reward-gap temperatures ``τ_{k,i} = r^k − r^i``
    (``i > k``) and ``τ_{k,k} = max_{i>k} τ_{k,i}``::

        loss = Σ_{k=1}^{n−1} [log(1e−10 + e^{τ_kk s^k} + Σ_{i>k} e^{τ_ki s^i}) − τ_kk s^k] + λ(n−1)²·(−a^1)

    with ``a^1`` the **summed** log-prob of the best response and λ = ``sft_weight`` (default 2).

    Source: Song et al. 2023, arXiv 2306.17492; ``AlibabaResearch/DAMO-ConvAI`` ``PRO/train/utils/process_manager.py``
    (``compute_loss``), written from a reading of that code (not run against it). ``rewards=None``
    is ours: every temperature is 1 (plain Plackett–Luce on the scores); the authors' no-score path sets all
    rewards equal, which makes every temperature 0 and the ranking term constant.

    Returns ``chosen_rewards = s^1``, ``rejected_rewards = max_{i>1} s^i`` (the strongest competitor), ``logits =
    s^1 − max_{i>1} s^i``, ``metrics``: ``ranking_loss`` and ``sft`` (``= −a^1``).
    """
    check_shape("pro", ("B", "n"), min_last=2, policy_logps=policy_logps, lengths=lengths, rewards=rewards)
    if isinstance(sft_weight, bool) or not isinstance(sft_weight, (int, float)) or not 0 <= sft_weight < math.inf:
        raise ValueError(f"losses.pro: `sft_weight` must be a finite number >= 0, got {sft_weight!r}.")
    if lengths is not None:
        if bool((lengths <= 0).any()):
            raise ValueError("losses.pro: `lengths` must be > 0 everywhere (completion-token counts).")
        scores = policy_logps / lengths.to(policy_logps.dtype)
    else:
        scores = policy_logps
    n = policy_logps.shape[1]
    if rewards is not None:
        r = rewards.detach().to(scores.dtype)
        if bool((r[:, 1:] > r[:, :-1]).any()):
            raise ValueError("losses.pro: sort each row best first; `rewards` must be non-increasing along dim 1.")
    log_eps = math.log(_PRO_EPS)
    ranking = torch.zeros_like(scores[:, 0])
    for k in range(n - 1):
        if rewards is None:
            tau = torch.ones_like(scores[:, k:])
        else:
            gaps = r[:, k : k + 1] - r[:, k + 1 :]  # τ_{k,i}, i > k
            tau = torch.cat([gaps.max(dim=1, keepdim=True).values, gaps], dim=1)
        terms = tau * scores[:, k:]  # column 0 is the positive
        lse = torch.logaddexp(torch.logsumexp(terms, dim=1), torch.full_like(ranking, log_eps))
        ranking = ranking + lse - terms[:, 0]
    sft = -policy_logps[:, 0]
    best_other = scores[:, 1:].max(dim=1).values
    return LossOutput(
        losses=ranking + sft_weight * (n - 1) ** 2 * sft,
        chosen_rewards=scores[:, 0].detach(),
        rejected_rewards=best_other.detach(),
        logits=(scores[:, 0] - best_other).detach(),
        metrics={"ranking_loss": ranking.detach(), "sft": sft.detach()},
    )


def _multi_negative_inputs(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_logps(name, policy_chosen_logps=policy_chosen_logps, reference_chosen_logps=reference_chosen_logps)
    check_shape(
        name, ("B", "K"), policy_rejected_logps=policy_rejected_logps, reference_rejected_logps=reference_rejected_logps
    )
    if policy_rejected_logps.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(
            f"losses.{name}: `policy_rejected_logps` has {policy_rejected_logps.shape[0]} rows but "
            f"`policy_chosen_logps` has {policy_chosen_logps.shape[0]}; pass (B,) chosen and (B, K) negatives."
        )
    check_positive(name, beta=beta)
    return (
        policy_chosen_logps - reference_chosen_logps.detach(),
        policy_rejected_logps - reference_rejected_logps.detach(),
    )


@register("dmpo", needs_reference=True, kind="listwise")
def dmpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 1.0,
) -> LossOutput:
    """Multi-negative DPO (DynamicPO's base): ``loss = −ls(β·ρ_w − (β/K)·Σ_k ρ_{l_k})``.

    Chosen ``(B,)``, negatives ``(B, K)``. Source: DynamicPO's base objective (Hu et al. 2026, arXiv 2605.00327;
    ``xingyuHuxingyu/DynamicPO`` ``trainer/dynamicpo_trainer.py``). K = 1 is DPO. At policy ==
    reference the loss is ln 2.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·mean_k ρ_{l_k}``, ``logits`` = the sigmoid argument.
    """
    rho_w, rho_l = _multi_negative_inputs(
        "dmpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    z = beta * rho_w - beta * rho_l.mean(dim=1)
    return LossOutput(
        losses=-F.logsigmoid(z),
        chosen_rewards=(beta * rho_w).detach(),
        rejected_rewards=(beta * rho_l.mean(dim=1)).detach(),
        logits=z.detach(),
    )


def _top_cluster_1d(values: torch.Tensor, clusters: int = 3, iterations: int = 100) -> torch.Tensor:
    """Boolean mask of the highest-mean cluster of 1-D k-means (Lloyd, centroids started at evenly spaced quantiles)."""
    k = min(clusters, values.numel())
    centroids = torch.quantile(values, torch.linspace(0, 1, k, dtype=values.dtype, device=values.device))
    assign = torch.zeros_like(values, dtype=torch.long)
    for step in range(iterations):
        new = (values[:, None] - centroids[None, :]).abs().argmin(dim=1)
        if step > 0 and bool((new == assign).all()):
            break
        assign = new
        for c in range(k):
            members = values[assign == c]
            if members.numel():
                centroids[c] = members.mean()
    best = max((c for c in range(k) if bool((assign == c).any())), key=lambda c: centroids[c].item())
    return assign == best


def dynamicpo_boundary(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> torch.Tensor:
    """DynamicPO's boundary negatives, ``(B, K)`` bool: ``a_{l_k} ≥ a_w``; a row with none takes the highest-mean
    cluster of a 3-means clustering of its negatives' policy log-probs."""
    a_w = policy_chosen_logps.detach()
    a_l = policy_rejected_logps.detach()
    boundary = a_l >= a_w[:, None]
    for row in range(a_l.shape[0]):
        if not bool(boundary[row].any()):
            boundary[row] = _top_cluster_1d(a_l[row])
    return boundary


@register("dynamicpo", needs_reference=True, kind="listwise")
def dynamicpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 1.0,
    margin: float = 2.0,
) -> LossOutput:
    """DynamicPO: ``loss = −ls((1/|B|)·Σ_{j∈B} β_j·(ρ_w − ρ_{l_j}))`` over the boundary negatives ``B``.

    Chosen ``(B,)``, negatives ``(B, K)``. ``B`` = :func:`dynamicpo_boundary` (negatives the policy already rates
    at least as likely as the chosen one; else the top cluster of a 3-means of their policy log-probs); the others are
    "discriminative" (if ``B`` is everything, discriminative := ``B``). Dual-margin dynamic β, detached:
    ``d₁ = a_w − a_{l_j}``, ``d₂ = a_{l_j} − mean_{discriminative} a_l``,
    ``β_j = β·(1 + ½·tanh((d₁ − d₂ − margin)/(|d₁| + |d₂|)))`` (fixed margin 2.0).

    Source: Hu et al. 2026, arXiv 2605.00327; ``xingyuHuxingyu/DynamicPO`` ``trainer/dynamicpo_trainer.py``
    (``preference_loss``; defaults β = 1, 5 negatives). Ours / unverified
    against that code: the k-means details (1-D Lloyd from quantile starts, up to 100 iterations) and the 1e-12 floor
    on ``|d₁| + |d₂|``. At policy == reference the loss is ln 2.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·mean_{j∈B} ρ_{l_j}``, ``logits`` = the sigmoid
    argument, ``metrics``: ``num_boundary`` and ``mean_beta`` (over ``B``).
    """
    rho_w, rho_l = _multi_negative_inputs(
        "dynamicpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    check_positive("dynamicpo", margin=margin)
    boundary = dynamicpo_boundary(policy_chosen_logps, policy_rejected_logps)
    a_w = policy_chosen_logps.detach()[:, None]
    a_l = policy_rejected_logps.detach()
    disc = ~boundary
    disc = torch.where(disc.any(dim=1, keepdim=True), disc, boundary)
    bf, df = boundary.to(a_l.dtype), disc.to(a_l.dtype)
    easy_mean = (a_l * df).sum(dim=1, keepdim=True) / df.sum(dim=1, keepdim=True)
    d1 = a_w - a_l
    d2 = a_l - easy_mean
    betas = beta * (1 + 0.5 * torch.tanh((d1 - d2 - margin) / (d1.abs() + d2.abs()).clamp(min=1e-12)))
    count = bf.sum(dim=1)
    z = (betas * bf * (rho_w[:, None] - rho_l)).sum(dim=1) / count
    return LossOutput(
        losses=-F.logsigmoid(z),
        chosen_rewards=(beta * rho_w).detach(),
        rejected_rewards=(beta * (rho_l * bf).sum(dim=1) / count).detach(),
        logits=z.detach(),
        metrics={"num_boundary": count.detach(), "mean_beta": ((betas * bf).sum(dim=1) / count).detach()},
    )
