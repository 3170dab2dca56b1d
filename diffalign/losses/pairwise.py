"""Reference-based preference losses: the paired DPO family (dpo, ipo, hinge, robust, poly_dpo) and unpaired KTO.

Notation (per pair): ``a_w, a_l`` policy log-likelihoods of chosen / rejected, ``b_w, b_l`` the reference's,
``ρ = a − b`` (log-ratio), ``h = ρ_w − ρ_l`` (DPO margin), ``ls = log σ``. Every paired loss here reports
``chosen_rewards = β·ρ_w`` and ``rejected_rewards = β·ρ_l`` (TRL's ``rewards/chosen|rejected``) and
``logits = β·h`` (the DPO logit; ``> 0`` = prefers the chosen side), whatever the loss shape.

Diffusion convention: ``logp = −0.5·MSE`` (per-sample mean over C,H,W, fp32), so ``β·h`` with β = 5000 is exactly
the original Diffusion-DPO logit ``s = −(β/2)[(L^w_θ − L^l_θ) − (L^w_ref − L^l_ref)]``.

Reference inputs are detached here, so gradients reach the policy log-likelihoods only. Arithmetic follows torch's
type promotion of the inputs; pass float32 (or float64) — float16 log-likelihoods lose the small differences the
large diffusion β amplifies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.losses.registry import register
from diffalign.losses.types import LossOutput, check_logps, check_positive, check_smoothing


def _log_ratios(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the four ``(B,)`` inputs and ``beta``; return ``(ρ_w, ρ_l)`` with the reference detached."""
    check_logps(
        name,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    check_positive(name, beta=beta)
    return (
        policy_chosen_logps - reference_chosen_logps.detach(),
        policy_rejected_logps - reference_rejected_logps.detach(),
    )


def _paired_output(losses: torch.Tensor, rho_w: torch.Tensor, rho_l: torch.Tensor, beta: float) -> LossOutput:
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * rho_w).detach(),
        rejected_rewards=(beta * rho_l).detach(),
        logits=(beta * (rho_w - rho_l)).detach(),
    )


@register("dpo", needs_reference=True, kind="paired")
def dpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (sigmoid), optionally conservative: ``loss = −(1−ε)·ls(β·h) − ε·ls(−β·h)``, ε = ``label_smoothing``.

    Sources: Rafailov et al. 2023 (DPO); ε > 0 is cDPO (Mitchell's note) exactly as TRL ≤ 0.28
    ``DPOTrainer.dpo_loss(loss_type="sigmoid")`` (TRL 1.16 ignores ``label_smoothing`` for ``sigmoid``; use ε = 0
    for 1.16 parity). Diffusion-DPO: with ``logp = −0.5·MSE`` and β = 5000 this is
    ``SalesforceAIResearch/DiffusionDPO/train.py`` per pair (its ``--beta_dpo 5000``); diffusers' SD research
    script drops the ½, so its β = 2500 equals β = 5000 here. At policy == reference the loss is ln 2.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l``, ``logits = β·h``. ``0 ≤ ε ≤ 0.5``.
    """
    check_smoothing("dpo", label_smoothing, upper=0.5, inclusive=True)
    rho_w, rho_l = _log_ratios(
        "dpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    z = beta * (rho_w - rho_l)
    losses = -F.logsigmoid(z)
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return _paired_output(losses, rho_w, rho_l, beta)


@register("ipo", needs_reference=True, kind="paired")
def ipo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> LossOutput:
    """IPO: ``loss = (h̄ − 1/(2β))²`` with ``h̄ = ρ_w/len_w − ρ_l/len_l`` (β plays IPO's τ).

    Source: Azar et al. 2023 (IPO); TRL 1.16 ``DPOTrainer`` ``loss_type="ipo"``, which averages the log-ratios
    per completion token. For TRL parity pass the summed token log-probs and ``chosen_lengths`` /
    ``rejected_lengths`` (``(B,)`` completion-token counts); leave them ``None`` (diffusion) to use ``h̄ = h``.
    At policy == reference the loss is ``(1/(2β))²``.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l`` (not length-normalised, as TRL logs them) and
    ``logits = β·h̄``.
    """
    rho_w, rho_l = _log_ratios(
        "ipo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("losses.ipo: pass both `chosen_lengths` and `rejected_lengths`, or neither.")
    if chosen_lengths is not None and rejected_lengths is not None:
        for key, lengths in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if not isinstance(lengths, torch.Tensor) or lengths.shape != rho_w.shape:
                got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
                raise ValueError(f"losses.ipo: `{key}` must be a tensor of shape {tuple(rho_w.shape)}, got {got}.")
            if bool((lengths <= 0).any()):
                raise ValueError(f"losses.ipo: `{key}` must be > 0 everywhere (completion-token counts).")
        margin = rho_w / chosen_lengths - rho_l / rejected_lengths
    else:
        margin = rho_w - rho_l
    losses = (margin - 1 / (2 * beta)) ** 2
    out = _paired_output(losses, rho_w, rho_l, beta)
    out.logits = (beta * margin).detach()
    return out


@register("hinge", needs_reference=True, kind="paired")
def hinge(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """Hinge (SLiC / RSO "hinge-norm"): ``loss = max(0, 1 − β·h)``; margin 1/β in log-ratio units.

    Source: TRL 1.16 ``DPOTrainer`` ``loss_type="hinge"`` (Zhao et al. 2023 SLiC; Liu et al. 2023 RSO).
    Diffusers' SD Diffusion-DPO script has the same form with its no-½ β. At policy == reference the loss is 1.

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l``, ``logits = β·h``.
    """
    rho_w, rho_l = _log_ratios(
        "hinge", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = torch.relu(1 - beta * (rho_w - rho_l))
    return _paired_output(losses, rho_w, rho_l, beta)


@register("robust", needs_reference=True, kind="paired")
def robust(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO: ``loss = [−(1−ε)·ls(β·h) + ε·ls(−β·h)] / (1 − 2ε)``, ε = assumed label-flip rate in [0, 0.5).

    Source: Chowdhury et al. 2024 (arXiv 2403.00409, unbiased under flip rate ε); TRL 1.16 ``DPOTrainer``
    ``loss_type="robust"`` with ``label_smoothing = ε``. ε = 0 is plain DPO. At policy == reference the loss is
    ln 2 for every ε. Unlike cDPO the loss is unbounded below for ε > 0 (it rewards large negative margins).

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l``, ``logits = β·h``.
    """
    check_smoothing("robust", label_smoothing, upper=0.5, inclusive=False)
    rho_w, rho_l = _log_ratios(
        "robust", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    z = beta * (rho_w - rho_l)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _paired_output(losses, rho_w, rho_l, beta)


@register("poly_dpo", needs_reference=True, kind="paired")
def poly_dpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    alpha: float,
) -> LossOutput:
    """Poly-DPO (ViPO, Li et al., ICLR 2026): ``loss = −log p + α·(1 − p)``, ``p = σ(β·h)`` (the DPO logit).

    Source: the ViPO project page (``liming-ai/ViPO``; no training code released), a Poly-1 loss on the DPO
    probability. α > 0 for noisy / conflicting data (Pick-a-Pic v2), α < 0 for trivially easy pairs, α = 0 is DPO;
    the authors' per-model α is not public, so there is no default. At policy == reference the loss is
    ``ln 2 + α/2``. Computed as ``−ls(β·h) + α·σ(−β·h)`` (same value, no cancellation).

    Returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l``, ``logits = β·h``.
    """
    rho_w, rho_l = _log_ratios(
        "poly_dpo", policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    z = beta * (rho_w - rho_l)
    losses = -F.logsigmoid(z) + alpha * torch.sigmoid(-z)
    return _paired_output(losses, rho_w, rho_l, beta)


@register("kto", needs_reference=True, kind="unpaired")
def kto(
    *,
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point: float | torch.Tensor | None = None,
) -> LossOutput:
    """KTO as in Diffusion-KTO: ``loss_i = w_{y_i}·(1 − σ((2y_i − 1)·β·(r_i − z₀)))``, per sample.

    ``r = policy_logps − reference_logps`` (log-ratio), ``y ∈ {0, 1}`` (1 = desirable), ``w_1 = desirable_weight``,
    ``w_0 = undesirable_weight``, ``z₀ = max(0, mean_batch r)`` treated as a constant (stop-gradient). A trainer
    running on several processes passes the all-reduced mean as ``reference_point`` (it is clamped at 0 here too,
    which is idempotent for an already-clamped value).

    Sources: ``jacklishufan/diffusion-kto/train_kto_sd_v1.5.py`` (halo "sigmoid", KL mode ``z₀ = clamp(mean r, 0)``);
    the same shape as TRL 1.16 ``KTOTrainer`` ``loss_type="kto"`` (which estimates z from mismatched pairs instead).

    β convention: Diffusion-KTO's reward is ``L_ref − L_θ = 2·(logp_θ − logp_ref)`` under ``logp = −0.5·MSE``, so
    its ``--beta_dpo 1000`` is ``beta=2000`` here (and its z₀ is twice ours; the loss is identical).

    Returns ``chosen_rewards = β·r`` for every sample (its implicit reward, whatever its label; split by ``labels`` to
    get TRL's ``rewards/chosen`` and ``rewards/rejected``), ``rejected_rewards = None``, ``logits =
    (2y − 1)·β·(r − z₀)`` (``> 0`` = agrees with the label) and ``metrics["kl"] = z₀`` broadcast to ``(B,)``.
    """
    check_logps("kto", policy_logps=policy_logps, reference_logps=reference_logps)
    check_positive("kto", beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    if not isinstance(labels, torch.Tensor) or labels.shape != policy_logps.shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"losses.kto: `labels` must be a tensor of shape {tuple(policy_logps.shape)}, got {got}.")
    if labels.dtype != torch.bool and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("losses.kto: `labels` must be 0/1 or bool (1 = desirable, 0 = undesirable).")
    desirable = labels.to(device=policy_logps.device, dtype=torch.bool)

    rho = policy_logps - reference_logps.detach()
    if reference_point is None:
        z0 = rho.detach().mean().clamp(min=0)
    else:
        z0 = torch.as_tensor(reference_point, dtype=rho.dtype, device=rho.device).detach().clamp(min=0)
        if z0.numel() != 1:
            raise ValueError(f"losses.kto: `reference_point` must be a scalar, got shape {tuple(z0.shape)}.")
        z0 = z0.reshape(())
    sign = desirable.to(rho.dtype) * 2 - 1
    logits = sign * beta * (rho - z0)
    weights = torch.where(
        desirable, torch.full_like(rho, desirable_weight), torch.full_like(rho, undesirable_weight)
    ).detach()
    losses = weights * (1 - torch.sigmoid(logits))
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * rho).detach(),
        rejected_rewards=None,
        logits=logits.detach(),
        metrics={"kl": z0.expand_as(rho).detach().clone()},
    )
