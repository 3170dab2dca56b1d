"""Reward shaping: reward-model ensembles, LSC log-sigmoid transform, PAR, and the CHES data-filtering score.

Pure tensor functions; rewards carry no gradient here (call under ``torch.no_grad`` in a trainer). Shapes:
``(N,)`` one reward per sample, ``(N, K)`` K ensemble members / reward components, ``(N, M)`` M reference rewards.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from diffalign.losses.types import check_shape

EnsembleMethod = Literal["mean", "min", "median", "uwo", "mean_minus_std"]
_METHODS: tuple[str, ...] = ("mean", "min", "median", "uwo", "mean_minus_std")


def ensemble_reward(
    member_rewards: torch.Tensor,
    *,
    method: EnsembleMethod = "mean",
    uncertainty_coef: float = 0.0,
) -> torch.Tensor:
    """Combine K reward-model scores ``(N, K)`` into one ``(N,)`` reward.

    * ``"mean"``: ``R̄ = (1/K) Σ_k R_k``
    * ``"min"``: worst-case optimisation (WCO) ``min_k R_k``
    * ``"median"``: ``median_k R_k`` (lower median for even K)
    * ``"uwo"``: uncertainty-weighted optimisation ``R̄ − λ·(1/K) Σ_k (R_k − R̄)²`` (population variance)
    * ``"mean_minus_std"``: ``R̄ − λ·std_k`` (population std), a common variant

    ``λ = uncertainty_coef``. Source: Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization"
    (ICLR 2024, arXiv 2310.02743) for mean / WCO / UWO (from the paper; no code read);
    members should be on comparable scales (the paper normalises each RM first).
    """
    check_shape("reward_shaping.ensemble_reward", ("N", "K"), member_rewards=member_rewards)
    if method not in _METHODS:
        raise ValueError(f"reward_shaping.ensemble_reward: method must be one of {_METHODS}, got {method!r}.")
    if method == "mean":
        return member_rewards.mean(dim=1)
    if method == "min":
        return member_rewards.min(dim=1).values
    if method == "median":
        return member_rewards.median(dim=1).values
    mean = member_rewards.mean(dim=1)
    var = member_rewards.var(dim=1, unbiased=False)
    if method == "uwo":
        return mean - uncertainty_coef * var
    return mean - uncertainty_coef * var.sqrt()


def lsc_transform(rewards: torch.Tensor, ref_rewards: torch.Tensor) -> torch.Tensor:
    """LSC (log-sigmoid-centred) transform ``u = log σ(r − r_ref)``; with ``(N, K)`` inputs, the AND-combination.

    ``rewards`` and ``ref_rewards`` broadcast; ``r_ref(x)`` is a per-prompt reference reward (e.g. a high quantile
    of base-policy rewards, :func:`lsc_reference`). For ``(N, K)`` reward components the transformed components
    are summed: ``u = Σ_k log σ(r_k − r_k^ref)`` ("logical AND"). Source: Wang et al., "Transforming and Combining
    Rewards for Aligning LLMs" (ICML 2024, arXiv 2402.00742), from the paper.
    """
    u = F.logsigmoid(rewards - ref_rewards)
    return u.sum(dim=-1) if u.dim() == 2 else u


def lsc_reference(ref_rewards: torch.Tensor, *, quantile: float = 0.85) -> torch.Tensor:
    """Per-prompt LSC reference ``r_ref`` from ``(N, M)`` base-policy rewards: normal fit, ``quantile`` percentile.

    ``r_ref = mean_m + Φ⁻¹(quantile)·std_m`` (population std — our choice). PAR's reimplementation of LSC fits a normal
    to the reference rewards and takes the 85th percentile (``PorUna-byte/PAR`` ``trainers/reward_shaper.py``); the
    exact std convention of that code was not verified.
    """
    check_shape("reward_shaping.lsc_reference", ("N", "M"), ref_rewards=ref_rewards)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"reward_shaping.lsc_reference: quantile must be in (0, 1), got {quantile!r}.")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile, dtype=torch.float64)).item()
    return ref_rewards.mean(dim=1) + z * ref_rewards.std(dim=1, unbiased=False)


def par_reward(rewards: torch.Tensor, ref_rewards: torch.Tensor, *, k: float = 1.0) -> torch.Tensor:
    """PAR (Preference As Reward): ``r_RL = (1/M) Σ_m σ(k·(r − r_ref^m))``, bounded in (0, 1).

    ``rewards`` ``(N,)``; ``ref_rewards`` ``(N, M)``: rewards of M reference responses to the same prompt, sampled
    from the SFT policy (``reward_maxref`` M = 10 by default; the paper finds M = 1 already optimal); ``k = 1``.
    Source: Fu et al., "Reward Shaping to Mitigate Reward Hacking in RLHF" (arXiv 2502.18770),
    ``PorUna-byte/PAR`` ``trainers/reward_shaper.py``.
    """
    check_shape("reward_shaping.par_reward", ("N", "M"), ref_rewards=ref_rewards)
    if rewards.dim() != 1 or rewards.shape[0] != ref_rewards.shape[0]:
        raise ValueError("reward_shaping.par_reward: `rewards` must be (N,) matching ref_rewards (N, M).")
    return torch.sigmoid(k * (rewards.unsqueeze(1) - ref_rewards)).mean(dim=1)


def _summed_hidden(fn: str, name: str, hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"reward_shaping.{fn}: `{name}` must be (B, T, D) hidden states.")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    elif mask.shape != hidden.shape[:2]:
        raise ValueError(f"reward_shaping.{fn}: mask for `{name}` must be (B, T) = {tuple(hidden.shape[:2])}.")
    mask = mask.to(hidden.dtype)
    return (hidden * mask.unsqueeze(-1)).sum(dim=1), mask.sum(dim=1)


def ches_score(
    hidden_chosen: torch.Tensor,
    hidden_rejected: torch.Tensor,
    chosen_mask: torch.Tensor | None = None,
    rejected_mask: torch.Tensor | None = None,
    *,
    length_normalized: bool = False,
) -> torch.Tensor:
    """CHES (Centered Hidden Embedding Similarity) per preference pair, ``(B,)``.

    ``hidden_*``: ``(B, T, D)`` last-layer hidden states (the unembedding's input) at the positions that *predict*
    the response tokens, i.e. from the last prompt token to the second-to-last response token, with ``(B, T)``
    masks selecting those positions (so ``|y| = Σ mask``). With ``H^± = Σ_k h_k(x, y^±)``::

        CHES = ⟨H⁺, H⁻⟩ − ‖H⁺‖²                                     (length_normalized=False)
        CHES = ⟨H⁺, H⁻⟩/(|y⁺||y⁻|) − ‖H⁺‖²/|y⁺|²                    (length_normalized=True)

    High CHES predicts likelihood displacement under DPO; Razin et al. filter the highest (length-normalised)
    CHES pairs before training. Source: Razin et al., "Unintentional Unalignment" (ICLR 2025, arXiv 2410.08847),
    ``princeton-nlp/unintentional-unalignment`` ``ches/ches.py`` (``compute_ches_scores``), written from a reading
    of that code (not run against it).
    """
    h_pos, n_pos = _summed_hidden("ches_score", "hidden_chosen", hidden_chosen, chosen_mask)
    h_neg, n_neg = _summed_hidden("ches_score", "hidden_rejected", hidden_rejected, rejected_mask)
    if h_pos.shape != h_neg.shape:
        raise ValueError("reward_shaping.ches_score: chosen and rejected must share batch size and hidden size.")
    cross = (h_pos * h_neg).sum(dim=-1)
    self_sq = (h_pos * h_pos).sum(dim=-1)
    if length_normalized:
        n_pos, n_neg = n_pos.clamp(min=1.0), n_neg.clamp(min=1.0)
        return cross / (n_pos * n_neg) - self_sq / n_pos**2
    return cross - self_sq


def d2_align_text_embeds(text_embeds: torch.Tensor, correction: torch.Tensor, *, omega: float = 1.5) -> torch.Tensor:
    """D²-Align's guided text embedding ``ẽ = e⁻ + ω·(e⁺ − e⁻)`` with ``e± = normalize(e ± b_v)``.

    ``text_embeds``: ``(N, D)`` reward-model text features ``e``; ``correction``: the single learned direction
    ``b_v`` ``(D,)`` shared by all prompts; ``ω > 1`` extrapolates from ``e⁻`` toward ``e⁺`` (CFG-like; the paper's
    value is 1.5). The guided reward is ``score(Φ_img(x), ẽ)``; with a cosine score ``ẽ``'s norm does not matter
    (the paper leaves re-normalisation unstated). Differentiable in ``b_v`` (stage 1
    learns it) and, with ``b_v = 0``, ``ẽ = normalize(e)``. Source: D²-Align (arXiv 2512.24146 v2, §3 and
    Algorithms 1-2), from the paper text; no code released.
    """
    if text_embeds.dim() != 2 or correction.shape != text_embeds.shape[1:]:
        raise ValueError(
            f"reward_shaping.d2_align_text_embeds: text_embeds must be (N, D) and correction (D,), got "
            f"{tuple(text_embeds.shape)} and {tuple(correction.shape)}."
        )
    plus = F.normalize(text_embeds + correction, dim=-1)
    minus = F.normalize(text_embeds - correction, dim=-1)
    return minus + omega * (plus - minus)


__all__ = ["ches_score", "d2_align_text_embeds", "ensemble_reward", "lsc_reference", "lsc_transform", "par_reward"]
