"""Policy-gradient surrogates: PPO/GRPO clipped objective (TRL 1.16 semantics), k3 KL, Flow-GRPO / GRPO-Guard.

Unlike the pairwise losses these are **not** per-sample: the GRPO aggregations couple the batch (token counts), so
each function returns the scalar loss TRL (or flow_grpo) would back-propagate plus detached metrics. They are not
registered in ``LOSSES`` (whose kinds are paired / unpaired / chosen-only preference losses); the diffusion per-step
losses are registered in :data:`~diffalign.losses.policy_registry.POLICY_LOSSES` (``online.policy_loss``) through
the :class:`~diffalign.losses.policy_registry.PolicyStep` entry points at the end of this module.

LLM side: ``logps`` are per-token log-probs ``(B, T)`` of the completion tokens with a ``(B, T)`` mask.
Diffusion side: ``logps`` are per-step Gaussian log-probs of the sampler transition (mean over latent elements,
fp32); either pass ``(B, T_steps)`` to :func:`clipped_policy_loss` or call the per-step Flow-GRPO functions below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from diffalign.losses.policy_registry import PolicyStep, register_policy_loss
from diffalign.losses.types import check_shape

Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
_AGGREGATIONS: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
_IS_LEVELS: tuple[str, ...] = ("token", "sequence")


@dataclass
class PolicyLossOutput:
    """Result of a policy-gradient surrogate.

    Attributes:
        loss: scalar, differentiable; what TRL / flow_grpo back-propagates (already divided by
            ``gradient_accumulation_steps`` where TRL does so).
        per_token_loss: unmasked per-token (or per-step) loss before aggregation, ``(B, T)`` (``(B,)`` for the
            per-step diffusion losses), differentiable.
        metrics: detached scalar tensors (names follow TRL / flow_grpo logging keys).
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ ‖ π_ref), elementwise (same shape as the inputs).

    ``k3 = exp(ref − logp) − (ref − logp) − 1 ≥ 0``, zero iff ``logp == ref`` (since ``e^x ≥ 1 + x``); unbiased for
    KL(π_θ‖π_ref) when the tokens are sampled from π_θ. Source: J. Schulman, "Approximating KL divergence" (2020);
    TRL 1.16 ``GRPOTrainer._compute_loss`` (``per_token_kl``). TRL adds it per token as ``+ β·k3_t`` *before* the
    aggregation, and with ``use_bias_correction_kl=True`` (default) multiplies ``k3_t`` by the importance ratio
    ``r_t`` first (value unchanged on-policy, gradient changed); see :func:`clipped_policy_loss`.
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's ``global_masked_mean`` on one process: token mean, or plain mean when ``x`` is ``(B, 1)``."""
    if x.shape[1] == 1:
        return x.sum() / max(x.shape[0], 1)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL's ``masked_seq_mean``: one value per sequence (NaN for an all-masked sequence, as in TRL)."""
    if x.shape[1] == 1:
        return x.squeeze(1)
    return (x * mask).sum(-1) / mask.sum(-1)


def _masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population std of the masked entries (``(B, 1)``: over sequences); 0 when there are fewer than 2."""
    if x.shape[1] == 1:
        vals = x.squeeze(1)
        return vals.std(unbiased=False) if vals.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
    mean = _masked_mean(x, mask)
    var = (((x - mean) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)
    return var.sqrt()


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: Aggregation = "dapo",
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_length: int | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
    delta: float | None = None,
    token_normalizer: float | torch.Tensor | None = None,
    gradient_accumulation_steps: int = 1,
) -> PolicyLossOutput:
    """PPO/GRPO clipped surrogate with TRL 1.16 ``GRPOTrainer._compute_loss`` semantics (one process).

    With ``M`` the mask, ``A`` the advantage (``(B,)`` broadcast over tokens, or ``(B, T)``)::

        log r_t = logp_t − old_t                                  (importance_sampling_level="token")
        log r   = Σ_t M_t (logp_t − old_t) / max(Σ_t M_t, 1)      ("sequence", GSPO: one ratio per sequence)
        ℓ_t = −min(r_t·A, clip(r_t, 1−ε_low, 1+ε_high)·A)         (with ``delta``: r_t → min(r_t, δ) in the
                                                                   unclipped branch, INTELLECT-2 two-sided clip)
        ℓ_t += β·k3_t·(r_t if use_bias_correction_kl else 1)      (β ≠ 0; k3 = :func:`k3_kl` vs ``ref_logps``)

    Aggregation (GA = ``gradient_accumulation_steps``):

    * ``"grpo"``: ``mean_b(Σ_t ℓ M / max(Σ_t M, 1)) / GA``
    * ``"bnpo"``: ``Σ ℓ M / max(Σ M, 1) / GA`` (TRL's token-count normalisation; **not** the BNPO paper, whose
      idea is the Beta advantage in :mod:`diffalign.losses.advantages`)
    * ``"dr_grpo"``: ``Σ ℓ M / (B · max_completion_length) / GA`` (Dr. GRPO)
    * ``"dapo"`` (TRL default): ``Σ ℓ M / token_normalizer``; TRL's normaliser is
      ``num_items_in_batch / num_processes · GA / steps_per_generation`` (tokens in the generation batch, rescaled
      to one accumulation window). Default here: ``max(Σ M, 1) · GA`` (the same when every micro-batch of the
      window holds as many tokens as this one and ``steps_per_generation == GA``, TRL's default).

    ``old_logps=None`` means on-policy (π_old = detached current policy, TRL's ``num_iterations=1`` shortcut):
    then ``r ≡ 1`` in value and the loss equals ``−aggregate(A)`` (plus the KL term).

    Metrics (detached; names as TRL logs them, for one process): ``clip_ratio/low_mean`` (fraction of tokens with
    ``r < 1−ε_low`` and ``A < 0``), ``clip_ratio/high_mean`` (``r > 1+ε_high`` and ``A > 0``),
    ``clip_ratio/region_mean`` (either), ``clip_ratio/low_min`` / ``clip_ratio/high_max`` (min / max over sequences
    of the per-sequence fractions), ``policy_loss`` (loss before ÷GA), ``kl`` (masked mean of the per-token KL
    term incl. the bias correction, only when β ≠ 0); ours in addition: ``ratio/mean``, ``ratio/std`` (masked,
    population std; over sequences at sequence level). With sequence-level IS, "tokens" above are sequences.

    Source: ``trl/trainer/grpo_trainer.py`` ``GRPOTrainer._compute_loss`` of TRL 1.16.0 (read from the wheel; the
    parity test in ``tests/test_policy_losses.py`` drives it on raw tensors). Not covered: ``cispo``, ``sapo``,
    ``vespo``, ``luspo``, entropy masks/bonus, off-policy masking, vLLM IS correction.
    """
    fn = "clipped_policy_loss"
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"losses.{fn}: aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}.")
    if importance_sampling_level not in _IS_LEVELS:
        raise ValueError(
            f"losses.{fn}: importance_sampling_level must be one of {_IS_LEVELS}, got {importance_sampling_level!r}."
        )
    check_shape(fn, ("B", "T"), floating=False, logps=logps, old_logps=old_logps, mask=mask)
    mask = torch.ones_like(logps) if mask is None else mask.to(logps.dtype)
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if not (epsilon_low >= 0 and epsilon_high >= 0):
        raise ValueError(f"losses.{fn}: epsilon_low/high must be >= 0, got {epsilon_low!r}, {epsilon_high!r}.")
    if aggregation == "dr_grpo" and (max_completion_length is None or max_completion_length <= 0):
        raise ValueError(f"losses.{fn}: aggregation='dr_grpo' needs max_completion_length > 0.")
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError(f"losses.{fn}: beta != 0 needs ref_logps (B, T).")
        check_shape(fn, ("B", "T"), floating=False, logps=logps, ref_logps=ref_logps)
    if gradient_accumulation_steps < 1:
        raise ValueError(f"losses.{fn}: gradient_accumulation_steps must be >= 1.")

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if advantages.dim() != 2 or advantages.shape[0] != logps.shape[0]:
        raise ValueError(f"losses.{fn}: advantages must be (B,) or (B, T), got {tuple(advantages.shape)}.")

    if old_logps is None:
        old_logps = logps.detach()
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_iw)

    per_token_kl = None
    if beta != 0.0:
        assert ref_logps is not None
        per_token_kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl
    if per_token_loss.shape != logps.shape:  # (B, 1) at sequence level without KL / token advantages
        per_token_loss = per_token_loss.expand_as(logps)

    ga = float(gradient_accumulation_steps)
    if aggregation == "grpo":
        policy_loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        loss = policy_loss / ga
    elif aggregation == "bnpo":
        policy_loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        loss = policy_loss / ga
    elif aggregation == "dr_grpo":
        assert max_completion_length is not None
        policy_loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
        loss = policy_loss / ga
    else:  # dapo
        if token_normalizer is None:
            normalizer = mask.sum().clamp(min=1.0) * ga
        else:
            normalizer = torch.as_tensor(token_normalizer, dtype=logps.dtype, device=logps.device).clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normalizer
        policy_loss = loss

    with torch.no_grad():
        is_low = ((coef_1 < 1 - epsilon_low) & (advantages < 0)).to(logps.dtype)
        is_high = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).to(logps.dtype)
        is_region = torch.maximum(is_low, is_high)
        ratio = coef_1.detach()
        metrics: dict[str, torch.Tensor] = {
            "policy_loss": policy_loss.detach(),
            "clip_ratio/low_mean": _masked_mean(is_low, mask),
            "clip_ratio/high_mean": _masked_mean(is_high, mask),
            "clip_ratio/region_mean": _masked_mean(is_region, mask),
            "clip_ratio/low_min": _nanmin(_masked_seq_mean(is_low, mask)),
            "clip_ratio/high_max": _nanmax(_masked_seq_mean(is_high, mask)),
            "ratio/mean": _masked_mean(ratio, mask),
            "ratio/std": _masked_std(ratio, mask),
        }
        if per_token_kl is not None:
            metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)
    return PolicyLossOutput(loss=loss, per_token_loss=per_token_loss, metrics=metrics)


def _nanmin(x: torch.Tensor) -> torch.Tensor:
    """``trl.trainer.utils.nanmin``: min ignoring NaNs, NaN if all are NaN."""
    if torch.isnan(x).all():
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    return torch.min(x[~torch.isnan(x)])


def _nanmax(x: torch.Tensor) -> torch.Tensor:
    """``trl.trainer.utils.nanmax``: max ignoring NaNs, NaN if all are NaN."""
    if torch.isnan(x).all():
        return torch.tensor(float("nan"), dtype=x.dtype, device=x.device)
    return torch.max(x[~torch.isnan(x)])


# --------------------------------------------------------------------------------------------------------------------
# Diffusion side: Flow-GRPO per-step loss and GRPO-Guard (RatioNorm + gradient reweighting)
# --------------------------------------------------------------------------------------------------------------------


def _flow_clip_metrics(ratio: torch.Tensor, log_ratio: torch.Tensor, clip_range: float) -> dict[str, torch.Tensor]:
    r = ratio.detach()
    return {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((r - 1.0).abs() > clip_range).float().mean(),
        "clipfrac_gt_one": ((r - 1.0) > clip_range).float().mean(),
        "clipfrac_lt_one": ((1.0 - r) > clip_range).float().mean(),
        "ratio/mean": r.mean(),
        "ratio/std": r.std(unbiased=False) if r.numel() > 1 else torch.zeros_like(r.mean()),
    }


def _ppo_max(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def flow_grpo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float | None = 5.0,
) -> PolicyLossOutput:
    """Flow-GRPO / DDPO clipped loss for one trained sampler step ``j`` (all samples share the step).

    ``A = clip(A, −adv_clip_max, adv_clip_max)``, ``r = exp(logp_θ − logp_old)``,
    ``L = mean_b max(−A·r, −A·clip(r, 1−ε, 1+ε))``. ``logps`` are the step's Gaussian log-probs (mean over latent
    elements). Metrics: ``approx_kl = ½·mean((logp_θ − logp_old)²)``, ``clipfrac``, ``clipfrac_gt_one``,
    ``clipfrac_lt_one`` (flow_grpo names), ``ratio/mean``, ``ratio/std``.

    Source: ``yifan123/flow_grpo`` ``scripts/train_sd3.py`` (Flow-GRPO, arXiv 2505.05470); the KL term is
    :func:`flow_grpo_kl`, added by the caller as ``+ β·kl``.
    """
    fn = "flow_grpo_policy_loss"
    check_shape(fn, ("B",), floating=False, logps=logps, old_logps=old_logps, advantages=advantages)
    if adv_clip_max is not None:
        advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    per_sample = _ppo_max(ratio, advantages, clip_range)
    loss = per_sample.mean()
    metrics = _flow_clip_metrics(ratio, log_ratio, clip_range)
    metrics["policy_loss"] = loss.detach()
    return PolicyLossOutput(loss=loss, per_token_loss=per_sample, metrics=metrics)


def flow_grpo_kl(means: torch.Tensor, ref_means: torch.Tensor, std_dev_t: torch.Tensor | float) -> torch.Tensor:
    """Flow-GRPO's per-step KL to the reference, batch mean: ``mean_b[ mean_dims((μ_θ − μ_ref)²) / (2·σ_t²) ]``.

    ``means`` / ``ref_means``: ``(B, ...)`` predicted next-sample means of the policy and the reference (LoRA off);
    ``std_dev_t``: σ_t of the SDE step *without* the √(−Δ) factor, a number or ``(B,)``. This is the code's form;
    the paper writes ``‖μ_θ − μ_ref‖² / (2σ_t²Δt)`` — code-KL = paper-KL·|Δ|/D (flow_grpo ``train_sd3.py``).
    """
    if means.shape != ref_means.shape or means.dim() < 2:
        raise ValueError(
            f"losses.flow_grpo_kl: means {tuple(means.shape)} and ref_means {tuple(ref_means.shape)} must "
            "match, shape (B, ...)."
        )
    sq = ((means - ref_means) ** 2).flatten(1).mean(dim=1)
    std = torch.as_tensor(std_dev_t, dtype=sq.dtype, device=sq.device)
    return (sq / (2 * std**2)).mean()


def grpo_guard_log_ratio(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    means: torch.Tensor,
    old_means: torch.Tensor,
    *,
    std_dev_t: torch.Tensor | float,
    sqrt_dt: torch.Tensor | float,
) -> torch.Tensor:
    """GRPO-Guard RatioNorm: the normalised log-ratio ``(logp_θ − logp_old + b)·s`` per sample, ``(B,)``.

    ``s = mean(σ_t)·mean(√(−Δ))`` (batch means, as the code takes them; all samples share the step),
    ``b = mean_dims((μ_θ − μ_old)²) / (2 s²)`` where ``μ_old`` is the transition mean **stored at sampling time**
    and ``μ_θ`` the current one. Under the sampling noise ``x' = μ_old + s·z`` this equals
    ``mean_dims(z ⊙ (μ_θ − μ_old))`` — zero-mean, with a scale independent of ``s`` (our algebra;
    ``tests/test_policy_losses.py`` checks it).
    Source: ``scripts/train_sd3_GRPO_Guard.py`` (``config.rationorm``), read from the fork ``zhtmike/flow_grpo@2e2f712``
    that mirrors upstream ``yifan123/flow_grpo``; paper arXiv 2510.22319.

    ``b`` here is per sample, as the paper writes it. The released code differs (verified in that file, the
    ``config.rationorm`` branch of the training loop in ``main``, line 917 at 2e2f712): it takes
    ``(μθ − μold)².mean(dim=tuple(range(1, log_prob.ndim)))`` with a 1-D ``log_prob``, i.e. ``.mean(dim=())``, which
    torch reduces over every dimension — one bias, the mean over the whole micro-batch, added to every sample's
    log-ratio.
    """
    fn = "grpo_guard_log_ratio"
    check_shape(fn, ("B",), floating=False, logps=logps, old_logps=old_logps)
    if means.shape != old_means.shape or means.shape[0] != logps.shape[0]:
        raise ValueError(
            f"losses.{fn}: means {tuple(means.shape)} / old_means {tuple(old_means.shape)} must be (B, ...) and match."
        )
    sigma = torch.as_tensor(std_dev_t, dtype=logps.dtype, device=logps.device).mean()
    sdt = torch.as_tensor(sqrt_dt, dtype=logps.dtype, device=logps.device).mean()
    s = sdt * sigma
    bias = ((means - old_means) ** 2).flatten(1).mean(dim=1) / (2 * s**2)
    return (logps - old_logps + bias) * s


def grpo_guard_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    means: torch.Tensor,
    old_means: torch.Tensor,
    *,
    std_dev_t: torch.Tensor | float,
    sqrt_dt: torch.Tensor | float,
    clip_range: float,
    adv_clip_max: float | None = 5.0,
) -> PolicyLossOutput:
    """GRPO-Guard per-step loss: RatioNorm ratio + gradient reweighting by ``1/|Δ|``.

    ``r̂ = exp(`` :func:`grpo_guard_log_ratio` ``)``, ``L = mean_b max(−A·r̂, −A·clip(r̂, 1−ε, 1+ε)) / mean(√(−Δ))²``
    with ``A`` clipped to ``±adv_clip_max``. The released configs use a tiny symmetric ``clip_range`` (2e-6 OCR /
    GenEval, 4e-6 PickScore) and no KL; add ``β·`` :func:`flow_grpo_kl` yourself if wanted. Metrics as
    :func:`flow_grpo_policy_loss`, computed on ``r̂`` except ``approx_kl``, which (as in the code) uses the raw
    log-ratio. Source: as :func:`grpo_guard_log_ratio`.
    """
    fn = "grpo_guard_policy_loss"
    check_shape(fn, ("B",), floating=False, logps=logps, advantages=advantages)
    if adv_clip_max is not None:
        advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    log_ratio_hat = grpo_guard_log_ratio(logps, old_logps, means, old_means, std_dev_t=std_dev_t, sqrt_dt=sqrt_dt)
    ratio = torch.exp(log_ratio_hat)
    per_sample = _ppo_max(ratio, advantages, clip_range)
    sdt = torch.as_tensor(sqrt_dt, dtype=logps.dtype, device=logps.device).mean()
    loss = per_sample.mean() / sdt**2
    metrics = _flow_clip_metrics(ratio, logps - old_logps, clip_range)
    metrics["policy_loss"] = loss.detach()
    return PolicyLossOutput(loss=loss, per_token_loss=per_sample, metrics=metrics)


# --------------------------------------------------------------------------------------------------------------------
# Registered entry points (online.policy_loss): one trained sampler step, uniform signature
# --------------------------------------------------------------------------------------------------------------------


@register_policy_loss("flow_grpo")
def flow_grpo_step_loss(step: PolicyStep, *, clip_range: float, adv_clip_max: float | None) -> PolicyLossOutput:
    """``online.policy_loss: flow_grpo``: :func:`flow_grpo_policy_loss` on the step's log-probs."""
    return flow_grpo_policy_loss(
        step.logps, step.old_logps, step.advantages, clip_range=clip_range, adv_clip_max=adv_clip_max
    )


@register_policy_loss("grpo_guard", needs_means=True)
def grpo_guard_step_loss(step: PolicyStep, *, clip_range: float, adv_clip_max: float | None) -> PolicyLossOutput:
    """``online.policy_loss: grpo_guard``: :func:`grpo_guard_policy_loss` with the means stored at sampling time."""
    if step.old_means is None:
        raise ValueError("losses.grpo_guard_step_loss: needs old_means (rollouts must keep the transition means).")
    return grpo_guard_policy_loss(
        step.logps,
        step.old_logps,
        step.advantages,
        step.means,
        step.old_means,
        std_dev_t=step.std_dev_t,
        sqrt_dt=step.sqrt_dt,
        clip_range=clip_range,
        adv_clip_max=adv_clip_max,
    )


__all__ = [
    "PolicyLossOutput",
    "clipped_policy_loss",
    "flow_grpo_kl",
    "flow_grpo_policy_loss",
    "flow_grpo_step_loss",
    "grpo_guard_log_ratio",
    "grpo_guard_policy_loss",
    "grpo_guard_step_loss",
    "k3_kl",
]
