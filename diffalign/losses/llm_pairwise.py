"""Paired LLM preference objectives that TRL's ``DPOTrainer`` does not ship.

Reference-free: ``simpo``, ``alphapo``, ``cpo`` (contrastive, TRL ``experimental.cpo`` semantics), ``orpo``.
Reference-based: ``rpo`` (adversarial-regulariser form), ``irepo``, ``rso_sigmoid_norm`` / ``rso_hinge_norm`` (plus
the sampler :func:`rso_rejection_sample`), ``madpo`` (plus :func:`madpo_weights`), ``constrained_po``.
Conservative DPO (cDPO) is ``dpo(label_smoothing=ε)`` in :mod:`diffalign.losses.pairwise`; Poly-DPO and KTO live there
too.

Notation as in :mod:`diffalign.losses.pairwise`: ``a_w, a_l`` policy log-likelihoods (LLM: **summed** completion-token
log-probs), ``b_w, b_l`` the reference's, ``ρ = a − b``, ``h = ρ_w − ρ_l``, ``ls = log σ``.

Per-token averages. SimPO, AlphaPO, ORPO, CPO's ``simpo`` / ``alphapo`` types and constrained PO work on the per-token
average ``ā = a/|y|``. Pass the summed log-probs plus ``chosen_lengths`` / ``rejected_lengths`` (``(B,)`` completion
token counts, > 0); or pass values that are already averages and ``logps_are_averaged=True``. Passing neither raises
(silently treating sums as averages is the classic SimPO / ORPO bug). For diffusion, where no length exists, use
``logps_are_averaged=True`` with ``logp = −0.5·MSE``.

Gradients reach the policy inputs only; reference inputs, rewards, logits, metrics and data-dependent weights are
detached.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from diffalign.losses.pairwise import _log_ratios, _paired_output, dpo, hinge
from diffalign.losses.registry import register
from diffalign.losses.types import LossOutput, check_logps, check_positive, check_smoothing

# ----------------------------------------------------------------------------------------------- helpers


def _check_lengths(name: str, like: torch.Tensor, **lengths: torch.Tensor | None) -> None:
    for key, value in lengths.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.shape != like.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"losses.{name}: `{key}` must be a tensor of shape {tuple(like.shape)}, got {got}.")
        if bool((value <= 0).any()):
            raise ValueError(f"losses.{name}: `{key}` must be > 0 everywhere (completion-token counts).")


def _averaged(
    name: str,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    logps_are_averaged: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token averages ``(ā_w, ā_l)``: sums ÷ lengths, or the inputs as they are when ``logps_are_averaged``."""
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"losses.{name}: pass both `chosen_lengths` and `rejected_lengths`, or neither.")
    if chosen_lengths is not None:
        if logps_are_averaged:
            raise ValueError(
                f"losses.{name}: got lengths and `logps_are_averaged=True`; pass summed log-probs with lengths, "
                "or averages without."
            )
        _check_lengths(name, chosen, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        return chosen / chosen_lengths.to(chosen.dtype), rejected / rejected_lengths.to(rejected.dtype)
    if not logps_are_averaged:
        raise ValueError(
            f"losses.{name}: this loss uses per-token average log-probs; pass `chosen_lengths` and "
            "`rejected_lengths` with summed log-probs, or set `logps_are_averaged=True` if they are averages already."
        )
    return chosen, rejected


def _check_real(name: str, **values: float) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"losses.{name}: `{key}` must be a finite number, got {value!r}.")


def _check_nonnegative(name: str, **values: float) -> None:
    for key, value in values.items():
        _check_real(name, **{key: value})
        if value < 0:
            raise ValueError(f"losses.{name}: `{key}` must be >= 0, got {value!r}.")


def _smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−(1−ε)·ls(z) − ε·ls(−z)`` (TRL CPO's ``sigmoid`` / ``simpo`` shape)."""
    losses = -F.logsigmoid(z)
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses


def alphapo_reward(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward transform ``r(x) = (1 − e^{−α·x})/α = (1 − p^{−α})/α`` with ``p = e^x``; ``r = x`` at α = 0.

    Computed as ``−expm1(−α·x)/α`` (no cancellation for small α).
    """
    if alpha == 0:
        return x
    return -torch.expm1(-alpha * x) / alpha


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − e^x)`` for ``x < 0``, stable on both sides of ``−ln 2``."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ----------------------------------------------------------------------------------------------- reference-free


@register("simpo", needs_reference=False, kind="paired")
def simpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    logps_are_averaged: bool = False,
) -> LossOutput:
    """SimPO: ``loss = −(1−ε)·ls(z) − ε·ls(−z)``, ``z = β·(ā_w − ā_l) − γ`` (per-token averages, no reference).

    Source: Meng, Xia & Chen 2024, arXiv 2405.14734 (``princeton-nlp/SimPO``, whose ``gamma_beta_ratio`` is γ/β);
    TRL 1.16 ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"``, ``simpo_gamma = γ`` and
    ``cpo_alpha=0``. The paper uses ε = 0 and β ≈ 2–2.5, γ/β ≈ 0.3–0.6; TRL defaults β = 0.1, γ = 0.5.
    See the module docstring for lengths / ``logps_are_averaged``. At ā_w = ā_l the loss is ``−ls(−γ) = ln(1 + e^γ)``
    (ln 2 at γ = 0).

    Returns ``chosen_rewards = β·ā_w``, ``rejected_rewards = β·ā_l`` (TRL's convention), ``logits = z``.
    """
    return _averaged_margin_loss(
        "simpo",
        policy_chosen_logps,
        policy_rejected_logps,
        beta=beta,
        alpha=0.0,
        gamma=gamma,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        logps_are_averaged=logps_are_averaged,
    )


@register("alphapo", needs_reference=False, kind="paired")
def alphapo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float,
    alpha: float,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    logps_are_averaged: bool = False,
) -> LossOutput:
    """AlphaPO: SimPO on the transformed reward ``r(ā) = (1 − e^{−α·ā})/α``: ``z = β·(r(ā_w) − r(ā_l)) − γ``.

    ``loss = −(1−ε)·ls(z) − ε·ls(−z)``. α = 0 is SimPO exactly. Source: Gupta et al. 2025, arXiv 2501.03884
    (AlphaPO, reward shape ``(1 − p^{−α})/α`` with ``p = π(y|x)^{1/|y|}``); TRL 1.16
    ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (``"alphapo"`` is the same) and
    ``CPOConfig.alpha = α``. At ā_w = ā_l the loss is ``ln(1 + e^γ)``.

    Returns ``chosen_rewards = β·r(ā_w)``, ``rejected_rewards = β·r(ā_l)`` (as TRL logs them), ``logits = z``.
    """
    return _averaged_margin_loss(
        "alphapo",
        policy_chosen_logps,
        policy_rejected_logps,
        beta=beta,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        logps_are_averaged=logps_are_averaged,
    )


def _averaged_margin_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    gamma: float,
    label_smoothing: float,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    logps_are_averaged: bool,
) -> LossOutput:
    """SimPO / AlphaPO: ``z = β·(r(ā_w) − r(ā_l)) − γ`` with AlphaPO's ``r`` (the identity at α = 0)."""
    check_logps(name, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_positive(name, beta=beta)
    _check_real(name, alpha=alpha, gamma=gamma)
    check_smoothing(name, label_smoothing, upper=0.5, inclusive=True)
    x_w, x_l = _averaged(
        name, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, logps_are_averaged
    )
    r_w, r_l = alphapo_reward(x_w, alpha), alphapo_reward(x_l, alpha)
    z = beta * (r_w - r_l) - gamma
    return LossOutput(
        losses=_smoothed_sigmoid_loss(z, label_smoothing),
        chosen_rewards=(beta * r_w).detach(),
        rejected_rewards=(beta * r_l).detach(),
        logits=z.detach(),
    )


@register("cpo", needs_reference=False, kind="paired")
def cpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    alpha: float = 0.0,
    cpo_alpha: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    logps_are_averaged: bool = False,
    chosen_nll: torch.Tensor | None = None,
) -> LossOutput:
    """Contrastive Preference Optimization with TRL ``CPOTrainer.cpo_loss`` semantics, plus its NLL term per sample.

    With ``x`` = the margin inputs (``sigmoid``: the inputs as given, i.e. summed log-probs as TRL; ``simpo`` /
    ``alphapo``: per-token averages ``ā``), ``L = x_w − x_l``, or ``L = r(x_w) − r(x_l)`` with AlphaPO's
    ``r(x) = (1 − e^{−α·x})/α`` when ``alpha ≠ 0`` (any ``loss_type``, as TRL):

    * ``"sigmoid"``: ``pref = −(1−ε)·ls(β·L) − ε·ls(−β·L)`` (CPO eq. 3 with label smoothing);
    * ``"simpo"`` / ``"alphapo"``: ``pref = −(1−ε)·ls(β·L − γ) − ε·ls(−(β·L − γ))``;
    * ``loss_i = pref_i + cpo_alpha·nll_i``.

    ``nll_i`` is ``chosen_nll`` when given (any per-sample NLL the caller computed), otherwise the per-token average
    ``−a_w/|y_w|`` (needs lengths, or ``logps_are_averaged=True``); when ``cpo_alpha = 0`` no NLL is needed. TRL's
    NLL is one token-mean over the micro-batch, so the batch mean of ``loss_i`` equals TRL's total only for equal
    lengths (or with ``chosen_nll`` set to the batch value). ``"alphapo"`` in TRL also forces ``cpo_alpha=0``; here
    ``cpo_alpha`` is always yours to set.

    Source: Xu et al. 2024, arXiv 2401.08417 (CPO, ``fe1ixxu/ALMA``); TRL 1.16
    ``trl.experimental.cpo.CPOTrainer.cpo_loss`` (defaults β = 0.1, γ = ``simpo_gamma`` = 0.5, ``cpo_alpha`` = 1).
    At equal inputs ``pref`` is ln 2 (``sigmoid``) or ``ln(1 + e^γ)`` (``simpo``).

    Returns ``chosen_rewards = β·x_w`` (``β·r(x_w)`` under AlphaPO), ``rejected_rewards`` likewise, ``logits`` = the
    sigmoid argument, ``metrics``: ``preference_loss`` and ``nll`` (when used).
    """
    name = "cpo"
    check_logps(name, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_positive(name, beta=beta)
    _check_real(name, gamma=gamma, alpha=alpha)
    _check_nonnegative(name, cpo_alpha=cpo_alpha)
    check_smoothing(name, label_smoothing, upper=0.5, inclusive=True)
    if loss_type not in ("sigmoid", "simpo", "alphapo"):
        raise ValueError(f"losses.{name}: `loss_type` must be 'sigmoid', 'simpo' or 'alphapo', got {loss_type!r}.")
    if chosen_nll is not None:
        check_logps(name, policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)

    need_avg = loss_type != "sigmoid" or (cpo_alpha > 0 and chosen_nll is None)
    if need_avg:
        avg_w, avg_l = _averaged(
            name, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, logps_are_averaged
        )
    else:
        _check_lengths(name, policy_chosen_logps, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    if loss_type == "sigmoid":
        x_w, x_l = policy_chosen_logps, policy_rejected_logps
    else:
        x_w, x_l = avg_w, avg_l
    r_w, r_l = alphapo_reward(x_w, alpha), alphapo_reward(x_l, alpha)
    z = beta * (r_w - r_l)
    if loss_type != "sigmoid":
        z = z - gamma
    pref = _smoothed_sigmoid_loss(z, label_smoothing)
    metrics = {"preference_loss": pref.detach()}
    losses = pref
    if cpo_alpha > 0:
        nll = chosen_nll if chosen_nll is not None else -avg_w
        losses = pref + cpo_alpha * nll
        metrics["nll"] = nll.detach()
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * r_w).detach(),
        rejected_rewards=(beta * r_l).detach(),
        logits=z.detach(),
        metrics=metrics,
    )


@register("orpo", needs_reference=False, kind="paired")
def orpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    logps_are_averaged: bool = False,
    chosen_nll: torch.Tensor | None = None,
) -> LossOutput:
    """ORPO: ``loss = nll − β·ls(LO)``, ``LO = (ā_w − ā_l) − [log(1 − e^{ā_w}) − log(1 − e^{ā_l})]``.

    ``LO`` is the log odds ratio of the per-token-average likelihoods (``log1mexp`` with the branch at −ln 2).
    ``nll`` is ``chosen_nll`` when given, else ``−ā_w`` (the chosen completion's per-token NLL, the paper's L_SFT).
    TRL's NLL is a token-mean over the whole chosen sequence **including prompt tokens** over the micro-batch; pass
    ``chosen_nll`` to reproduce it. β is the paper's λ.

    Source: Hong, Lee & Thorne 2024, arXiv 2403.07691 (``xfactlab/orpo``); TRL 1.16
    ``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss``, whose per-example value is ``β·ls(LO)`` (our
    ``metrics["or_loss"] = −β·ls(LO)``). Needs ``ā < 0`` (a probability below 1); ``ā > 0`` raises. At
    ``ā_w = ā_l`` the odds-ratio term is ``β·ln 2``.

    Returns ``chosen_rewards = β·ā_w``, ``rejected_rewards = β·ā_l``, ``logits = LO``, ``metrics``: ``or_loss``,
    ``nll``.
    """
    name = "orpo"
    check_logps(name, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_positive(name, beta=beta)
    if chosen_nll is not None:
        check_logps(name, policy_chosen_logps=policy_chosen_logps, chosen_nll=chosen_nll)
    x_w, x_l = _averaged(
        name, policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, logps_are_averaged
    )
    if bool((x_w.detach() > 0).any()) or bool((x_l.detach() > 0).any()):
        raise ValueError(f"losses.{name}: average log-probs must be <= 0 (they are log-probabilities).")
    log_odds = (x_w - x_l) - (_log1mexp(x_w) - _log1mexp(x_l))
    or_loss = -beta * F.logsigmoid(log_odds)
    nll = chosen_nll if chosen_nll is not None else -x_w
    return LossOutput(
        losses=nll + or_loss,
        chosen_rewards=(beta * x_w).detach(),
        rejected_rewards=(beta * x_l).detach(),
        logits=log_odds.detach(),
        metrics={"or_loss": or_loss.detach(), "nll": nll.detach()},
    )


# ----------------------------------------------------------------------------------------------- reference-based


@register("rpo", needs_reference=True, kind="paired")
def rpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    eta: float = 0.005,
) -> LossOutput:
    """RPO, adversarial-regulariser form: ``loss = −ls(β·h) − η·β·a_w`` (``a_w`` the **summed** chosen log-prob).

    Source: Liu et al., NeurIPS 2024, arXiv 2405.16436 ("Provably mitigating overoptimization in RLHF: your SFT loss
    is implicitly an adversarial regularizer"); ``YSLIU627/Regularized-Preference-Optimization``
    ``alignment-handbook/scripts/rpo_trainer.py``. Paper setting β = 0.01, η = 0.005. Not TRL's ``sft`` term / old
    ``rpo_alpha`` (token-means) nor Iterative-RPO's length-normalised NLL. At policy == reference the loss is
    ``ln 2 − η·β·a_w``.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l``, ``logits = β·h``, ``metrics["nll"] = −a_w``.
    """
    _check_nonnegative("rpo", eta=eta)
    rho_w, rho_l = _log_ratios(
        "rpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = -F.logsigmoid(beta * (rho_w - rho_l)) - eta * beta * policy_chosen_logps
    out = _paired_output(losses, rho_w, rho_l, beta)
    out.metrics["nll"] = (-policy_chosen_logps).detach()
    return out


@register("irepo", needs_reference=True, kind="paired")
def irepo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    preference_probs: torch.Tensor,
    beta: float,
    prob_clip: float = 1e-3,
) -> LossOutput:
    """iREPO: regress the implicit-reward gap onto the empirical preference logit, ``loss = (β·h − logit(p̂))²``.

    ``p̂ = preference_probs`` (``(B,)``, the empirical probability that the first / "chosen" response is preferred,
    e.g. the fraction of annotators), clipped to ``[prob_clip, 1 − prob_clip]`` before the logit. The reference is
    the previous iterate (the trainer's job).

    Source: Le et al. 2024, arXiv 2405.15230 (iREPO). **Unverified**: no authors' code was found; the formula is
    taken from the paper's abstract and a summary of its method, and the exact normalisation (any 1/2,
    β placement, clipping of p̂) must be checked against §4 of the paper. The clipping is ours. At policy ==
    reference and p̂ = ½ the loss is 0.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l``, ``logits = β·h``, ``metrics["target"] =
    logit(p̂)``.
    """
    rho_w, rho_l = _log_ratios(
        "irepo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    check_logps("irepo", policy_chosen_logps=policy_chosen_logps, preference_probs=preference_probs)
    if not (isinstance(prob_clip, numbers.Real) and 0 < prob_clip < 0.5):
        raise ValueError(f"losses.irepo: `prob_clip` must be in (0, 0.5), got {prob_clip!r}.")
    if bool(((preference_probs < 0) | (preference_probs > 1)).any()):
        raise ValueError("losses.irepo: `preference_probs` must lie in [0, 1].")
    p = preference_probs.detach().clamp(prob_clip, 1 - prob_clip)
    target = torch.log(p) - torch.log1p(-p)
    losses = (beta * (rho_w - rho_l) - target) ** 2
    out = _paired_output(losses, rho_w, rho_l, beta)
    out.metrics["target"] = target
    return out


def rso_rejection_sample(
    rewards: torch.Tensor,
    *,
    beta: float = 0.5,
    num_samples: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RSO's statistical rejection sampler over one prompt's candidates; returns the accepted indices, in order.

    Targets ``π_r ∝ π_sft·exp(r/β)`` from SFT samples with rewards ``r`` (``(n,)``). Repeat until ``num_samples``
    are accepted: ``r_max`` = max reward among the remaining candidates; visit the remaining candidates in index
    order, draw ``u ~ U[0, 1)`` for each and accept iff ``u < exp((r − r_max)/β)`` (stop as soon as enough are
    accepted); remove the accepted ones. The current best is always accepted. β → 0 is top-k, β → ∞ is plain SFT
    sampling.

    Source: Liu et al. 2023, arXiv 2309.06657 (RSO), Appendix A.1 Algorithm 1 ``conduct_rejection_sampling``
    (paper: 64 candidates, ``num_samples`` = 8, β = 0.5). Uniforms come from ``torch.rand(generator=...)``, one per
    visited candidate, in visiting order.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError("rso_rejection_sample: `rewards` must be a floating 1-D tensor (one reward per candidate).")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rso_rejection_sample: `rewards` must be finite.")
    check_positive("rso_rejection_sample", beta=beta)
    n = rewards.numel()
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= n:
        raise ValueError(f"rso_rejection_sample: `num_samples` must be an int in [1, {n}], got {num_samples!r}.")
    r = rewards.detach().double().cpu().tolist()
    remaining = list(range(n))
    accepted: list[int] = []
    while len(accepted) < num_samples:
        r_max = max(r[i] for i in remaining)
        taken: list[int] = []
        for i in remaining:
            u = torch.rand((), generator=generator, dtype=torch.float64).item()
            if u >= math.exp((r[i] - r_max) / beta):
                continue
            accepted.append(i)
            taken.append(i)
            if len(accepted) == num_samples:
                break
        remaining = [i for i in remaining if i not in taken]
    return torch.tensor(accepted, dtype=torch.long, device=rewards.device)


@register("rso_sigmoid_norm", needs_reference=True, kind="paired")
def rso_sigmoid_norm(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    gamma: float = 0.05,
) -> LossOutput:
    """RSO sigmoid-norm: ``loss = −ls(γ·h)`` — DPO with the decoupled temperature γ (reference = the SFT policy).

    Source: Liu et al. 2023, arXiv 2309.06657 (RSO, γ = 0.05); equals ``dpo(beta=γ)`` / TRL ``sigmoid``. Train it on
    pairs drawn with :func:`rso_rejection_sample`. At policy == reference the loss is ln 2.

    Returns ``chosen_rewards = γ·ρ_w``, ``rejected_rewards = γ·ρ_l``, ``logits = γ·h``.
    """
    return dpo(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        beta=gamma,
    )


@register("rso_hinge_norm", needs_reference=True, kind="paired")
def rso_hinge_norm(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    gamma: float = 0.05,
) -> LossOutput:
    """RSO hinge-norm: ``loss = max(0, 1 − γ·h)`` (SLiC hinge on reference-normalised log-likelihoods).

    Source: Liu et al. 2023, arXiv 2309.06657 (RSO, γ = 0.05); equals ``hinge(beta=γ)`` / TRL ``hinge``. At
    policy == reference the loss is 1.

    Returns ``chosen_rewards = γ·ρ_w``, ``rejected_rewards = γ·ρ_l``, ``logits = γ·h``.
    """
    return hinge(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        beta=gamma,
    )


def madpo_weights(
    reward_margins: torch.Tensor,
    *,
    c_max: float = 2.0,
    c_min: float = 0.5,
    lam: float = 1.0,
    tau: float = 2.0,
) -> torch.Tensor:
    """MADPO per-pair weights ``w = σ(c(|m|)·m)/σ(m)`` if ``m > −τ`` else 1 (detached).

    ``m`` = reward-model margin ``r̂(y_w) − r̂(y_l)`` oriented to the labelled winner;
    ``c(|m|) = c_min + (c_max − c_min) / (1 + ((c_max − 1)/(1 − c_min))·e^{λ(|m| − τ)})`` (``c = 1`` at ``|m| = τ``,
    → c_min for easy pairs, ≈ c_max for hard ones). Needs ``0 < c_min < 1 < c_max``, λ, τ > 0.

    Source: Rho 2025, arXiv 2510.05342; ``sirano1004/Margin-Apative-Direct-Preference-Optimization``
    ``utils/loss_functions.py`` (``MADPOLoss``).
    """
    check_logps("madpo_weights", reward_margins=reward_margins)
    check_positive("madpo_weights", c_max=c_max, c_min=c_min, lam=lam, tau=tau)
    if not c_min < 1 < c_max:
        raise ValueError(f"losses.madpo_weights: need 0 < c_min < 1 < c_max, got c_min={c_min}, c_max={c_max}.")
    m = reward_margins.detach()
    k = (c_max - 1) / (1 - c_min)
    c = c_min + (c_max - c_min) / (1 + k * torch.exp(lam * (m.abs() - tau)))
    w = torch.exp(F.logsigmoid(c * m) - F.logsigmoid(m))
    return torch.where(m > -tau, w, torch.ones_like(w))


@register("madpo", needs_reference=True, kind="paired")
def madpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    reward_margins: torch.Tensor,
    beta: float = 0.1,
    c_max: float = 2.0,
    c_min: float = 0.5,
    lam: float = 1.0,
    tau: float = 2.0,
) -> LossOutput:
    """MADPO (margin-adaptive DPO): ``loss = w·(−ls(β·h))`` with ``w`` = :func:`madpo_weights` of the RM margins.

    ``reward_margins`` (``(B,)``) = a reward model's ``r̂(y_w) − r̂(y_l)`` (stage 1 of MADPO). Source: Rho 2025,
    arXiv 2510.05342; ``sirano1004/Margin-Apative-Direct-Preference-Optimization`` (``MADPOLoss``; defaults β = 0.1,
    c_max = 2, c_min = 0.5, λ = 1, τ = 2). At policy == reference the loss is ``w·ln 2``.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l``, ``logits = β·h``, ``metrics["weight"] = w``.
    """
    rho_w, rho_l = _log_ratios(
        "madpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    check_logps("madpo", policy_chosen_logps=policy_chosen_logps, reward_margins=reward_margins)
    w = madpo_weights(reward_margins, c_max=c_max, c_min=c_min, lam=lam, tau=tau).to(rho_w.dtype)
    out = _paired_output(w * -F.logsigmoid(beta * (rho_w - rho_l)), rho_w, rho_l, beta)
    out.metrics["weight"] = w
    return out


@register("constrained_po", needs_reference=True, kind="paired")
def constrained_po(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    gamma: float = 0.5,
    tau: float = 2.0,
    alpha: float = 1.0,
    variant: str = "main",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    logps_are_averaged: bool = False,
) -> LossOutput:
    """Constrained Preference Optimization on per-token averages: ``loss = −ls(z)``, ``δ_π = ā_w − ā_l``,
    ``δ_ref = ā^ref_w − ā^ref_l``:

    * ``"main"``: ``z = β·δ_π − β·δ_ref − (β/α)·m``, ``m = softplus(τ·(γ − δ_ref))/τ`` (a smooth ``max(0, γ − δ_ref)``);
    * ``"clip"``: ``z = β·(δ_π − max(δ_ref, 0))`` (the authors' config default);
    * ``"easy"``: ``z = β·δ_π − β·δ_ref − γ·(1/ā^ref_w + 1/ā^ref_l)``.

    Lengths apply to policy and reference alike (see the module docstring). Source: Yang et al. 2026, arXiv
    2605.20834 ("Conditional Equivalence of DPO and RLHF"); ``visitworld123/CPO`` ``cpo/trainer.py``,
    ``cpo/config.py`` (defaults β = 0.1, γ = 0.5, τ = 2, α = 1), written from a reading of that code (not
    run against it).

    Returns ``chosen_rewards = β·(ā_w − ā^ref_w)``, ``rejected_rewards = β·(ā_l − ā^ref_l)``, ``logits = z``,
    ``metrics["undesirable"]`` = 1.0 where ``δ_ref < δ_π < 0`` (DPO loss falls while the policy prefers y_l).
    """
    name = "constrained_po"
    check_logps(
        name,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    check_positive(name, beta=beta, tau=tau, alpha=alpha)
    _check_real(name, gamma=gamma)
    if variant not in ("main", "clip", "easy"):
        raise ValueError(f"losses.{name}: `variant` must be 'main', 'clip' or 'easy', got {variant!r}.")
    args = (chosen_lengths, rejected_lengths, logps_are_averaged)
    pw, pl = _averaged(name, policy_chosen_logps, policy_rejected_logps, *args)
    rw, rl = _averaged(name, reference_chosen_logps.detach(), reference_rejected_logps.detach(), *args)
    d_pi, d_ref = pw - pl, rw - rl
    if variant == "main":
        m = F.softplus(tau * (gamma - d_ref)) / tau
        z = beta * d_pi - beta * d_ref - (beta / alpha) * m
    elif variant == "clip":
        z = beta * (d_pi - d_ref.clamp(min=0))
    else:
        if bool((rw == 0).any()) or bool((rl == 0).any()):
            raise ValueError(f"losses.{name}: variant 'easy' divides by the reference averages; they must be != 0.")
        z = beta * d_pi - beta * d_ref - gamma * (1 / rw + 1 / rl)
    undesirable = ((d_pi < 0) & (d_pi > d_ref)).to(d_pi.dtype)
    return LossOutput(
        losses=-F.logsigmoid(z),
        chosen_rewards=(beta * (pw - rw)).detach(),
        rejected_rewards=(beta * (pl - rl)).detach(),
        logits=z.detach(),
        metrics={"undesirable": undesirable.detach()},
    )
