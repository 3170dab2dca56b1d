"""Losses that need no reference model: MaPO (paired, margin-aware) and SFT (chosen side only).

Diffusion convention: ``logp = −0.5·MSE`` (per-sample mean over C,H,W, fp32); MaPO converts back with
``L = −2·logp``. Gradients reach the policy log-likelihoods; rewards, logits and metrics are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.losses.registry import register
from diffalign.losses.types import LossOutput, check_logps, check_positive

# Below this |s·L| the Taylor series of x/(e^x − 1) is used: its first omitted term, x^6/30240, is < 4e-23 here.
_TAYLOR_BELOW = 1e-3


def mapo_score(mse: torch.Tensor, snr: float) -> torch.Tensor:
    """MaPO's bounded score ``g(L) = s·L / (e^{s·L} − 1)`` (``g → 1`` as ``s·L → 0``), decreasing in ``L``.

    Evaluated without overflow or 0/0: with ``x = s·L``, ``g(x) = |x|·e^{−|x|} / (1 − e^{−|x|}) + max(−x, 0)``
    (``expm1`` for the denominator), and ``1 − x/2 + x²/12 − x⁴/720`` for ``|x| < 1e-3``.
    """
    x = snr * mse
    small = x.abs() < _TAYLOR_BELOW
    a = torch.where(small, torch.ones_like(x), x.abs())
    far = a * torch.exp(-a) / -torch.expm1(-a) + torch.relu(-x)
    xs = torch.where(small, x, torch.zeros_like(x))
    near = 1 - xs / 2 + xs**2 / 12 - xs**4 / 720
    return torch.where(small, near, far)


@register("mapo", needs_reference=False, kind="paired")
def mapo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    snr: float = 0.5,
    num_train_timesteps: int = 1000,
) -> LossOutput:
    """MaPO (margin-aware preference optimisation), per pair, reference-free.

    With ``L^w = −2·policy_chosen_logps``, ``L^l = −2·policy_rejected_logps`` (the per-sample MSEs), ``s = snr``,
    ``T = num_train_timesteps``, ``g`` = :func:`mapo_score`::

        loss_i = L^w_i − β·log σ(T·(g(L^w_i) − g(L^l_i)))

    Source: ``mapo-t2i/mapo/utils.py::compute_loss`` (``--beta_mapo 0.1``, ``--snr_value 0.5``, T = the scheduler's
    ``num_train_timesteps``); its batch loss ``mean L^w − β·mean log σ(·)`` is the batch mean of ``loss_i``. The
    chosen term is the MSE itself (not −logp = ½·MSE), as in the original.

    Returns ``chosen_rewards = β·logp_w``, ``rejected_rewards = β·logp_l`` (TRL's ORPO/CPO convention for
    reference-free losses), ``logits = T·(g(L^w) − g(L^l))`` and ``metrics``: ``win_score = g(L^w)``,
    ``lose_score = g(L^l)`` (MaPO's "Win/Lose Score"), ``margin_loss = −β·log σ(logits)`` (its "OR loss").
    """
    check_logps("mapo", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    check_positive("mapo", beta=beta, snr=snr, num_train_timesteps=num_train_timesteps)
    mse_w = -2 * policy_chosen_logps
    mse_l = -2 * policy_rejected_logps
    win_score = mapo_score(mse_w, snr)
    lose_score = mapo_score(mse_l, snr)
    logits = num_train_timesteps * (win_score - lose_score)
    margin_loss = -beta * F.logsigmoid(logits)
    return LossOutput(
        losses=mse_w + margin_loss,
        chosen_rewards=(beta * policy_chosen_logps).detach(),
        rejected_rewards=(beta * policy_rejected_logps).detach(),
        logits=logits.detach(),
        metrics={
            "win_score": win_score.detach(),
            "lose_score": lose_score.detach(),
            "margin_loss": margin_loss.detach(),
        },
    )


@register("sft", needs_reference=False, kind="chosen_only")
def sft(*, policy_chosen_logps: torch.Tensor) -> LossOutput:
    """Supervised fine-tuning on the chosen side: ``loss_i = −policy_chosen_logps_i``.

    Diffusion: ``−logp = ½·MSE``, the plain denoising loss on the preferred image. The original
    ``DiffusionDPO/train.py --sft`` minimises the MSE itself (``F.mse_loss`` mean over B·C·H·W, the batch mean of
    the per-sample MSEs), i.e. twice this loss: double the learning rate (under SGD; Adam is scale-invariant up to
    its ε) to match it. LLM: with summed token log-probs this is the per-sequence NLL; TRL 1.16's ``sft`` term is a
    token mean over the micro-batch, i.e. the sum of these losses divided by the total completion-token count.

    Returns no rewards or logits.
    """
    check_logps("sft", policy_chosen_logps=policy_chosen_logps)
    return LossOutput(losses=-policy_chosen_logps, chosen_rewards=None, rejected_rewards=None)
