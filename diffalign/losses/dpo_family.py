"""Every TRL 1.16 ``DPOTrainer`` loss type, per example, on log-likelihood tensors (TRL 1.16.0 is the oracle).

Source for every formula here: ``trl/trainer/dpo_trainer.py`` of the ``trl==1.16.0`` wheel,
``DPOTrainer._compute_loss`` (the loss types are inlined there; TRL 1.16 has no standalone ``dpo_loss``); each
type's paper is cited in its docstring. ``tests/test_trl_parity.py`` drives that private method on raw tensors and
checks every type, option and the four reward metrics to 1e-6.

Registered names (all ``needs_reference=True``, ``kind="paired"``): ``trl_<loss_type>`` for each TRL loss type —
``trl_sigmoid, trl_hinge, trl_ipo, trl_exo_pair, trl_nca_pair, trl_robust, trl_bco_pair, trl_sppo_hard, trl_aot,
trl_aot_unpaired, trl_apo_zero, trl_apo_down, trl_discopop, trl_sft, trl_sigmoid_norm`` — and ``dpo_mixture``
(TRL's ``loss_type=[...]`` + ``loss_weights=[...]``). The ``trl_`` prefix keeps the diffusion names in
``pairwise.py`` / ``reference_free.py`` unchanged where TRL 1.16 means something else:

* ``dpo`` keeps cDPO label smoothing (TRL ≤ 0.28); ``trl_sigmoid`` has none (TRL 1.16 ignores ``label_smoothing``).
* ``sft`` is ``−logp`` per sample (diffusion ``--sft``); ``trl_sft`` is TRL's batch-level token-mean NLL of the
  chosen completions, broadcast to every pair.
* ``ipo``, ``hinge``, ``robust`` equal ``trl_ipo`` (with lengths), ``trl_hinge``, ``trl_robust`` at the default
  ``reverse_kl``; the ``trl_`` versions add the f-divergence, LD-DPO and WPO options.

Notation: ``a_w, a_l`` policy log-likelihoods of chosen / rejected (LLM: **sum** of completion-token log-probs),
``b_w, b_l`` the reference's, ``ρ = a − b``, ``h = ρ_w − ρ_l``, ``ls = log σ``, ε = ``label_smoothing``.
f-divergence score ``s(ρ)`` (``f_divergence_type``): ``reverse_kl`` ρ; ``forward_kl`` ``1 − e^{−ρ}``;
``js_divergence`` ``log 2 + ls(ρ)``; ``alpha_divergence`` ``(e^{(α−1)ρ} − 1)/(α−1)`` (exponent clamped ≤ 80, ≤ 11 in
fp16, computed in fp32; ``|α − 1| < 1e-6`` falls back to ρ), α = ``f_alpha_divergence_coef`` (default 0.5;
note TRL ≤ 0.28 parameterised α differently, identical only at 0.5). ``δ = s(ρ_w) − s(ρ_l)`` (= h for reverse_kl).
Source: Wang et al. 2023, "Beyond Reverse KL" (arXiv 2309.16240), as coded in TRL 1.16.

Inputs (keyword only). Either per-pair sums ``policy_chosen_logps`` / ``policy_rejected_logps`` ``(B,)`` or per-token
``policy_chosen_token_logps`` / ``policy_rejected_token_logps`` ``(B, T)`` with ``chosen_mask`` / ``rejected_mask``
``(B, T)`` (1 / True on completion tokens; the sum is taken over the mask). The reference likewise: sums
``reference_*_logps`` ``(B,)`` or ``reference_*_token_logps`` ``(B, T)`` on the same masks. Options that need
per-token inputs:

* **LD-DPO** (``ld_alpha`` ∈ [0, 1]; Liu et al. 2024, arXiv 2409.06411; TRL ``ld_alpha``): with
  ``ℓ_p = min(|y_w|, |y_l|)``, each log-likelihood becomes ``Σ_{t≤ℓ_p} log p_t + α·Σ_{t>ℓ_p} log p_t`` (t counted
  over the completion tokens). Needs policy per-token inputs; the reference is adjusted the same way when given per
  token, and used as is when given as sums (then it must already be LD-adjusted, as TRL's precomputed columns are).
* **WPO** (``use_weighting=True``; Zhou et al. 2024, arXiv 2406.11827 eq. 2; TRL ``use_weighting``): each
  per-example loss is multiplied by ``w(y_w)·w(y_l)``, ``w(y) = exp(mean_{t∈y}[log p_t − log Σ_v p_v(t)²])``
  computed without gradient; needs per-token policy log-probs and ``chosen_log_sum_sq_probs`` /
  ``rejected_log_sum_sq_probs`` ``(B, T)`` (``log Σ_v p_v²`` per position). Unclipped (TRL ≤ 0.28 clipped to ≤ 1).
  Not allowed with ``aot*`` (they sort the batch).
* **Lengths** for ``trl_ipo`` / ``trl_sigmoid_norm`` / ``trl_sft``: from the masks, or ``chosen_lengths`` /
  ``rejected_lengths`` ``(B,)`` with sums (TRL clamps lengths at ≥ 1). Without either (diffusion), lengths are 1.

Every function returns ``chosen_rewards = β·ρ_w``, ``rejected_rewards = β·ρ_l`` (TRL's logged rewards, whatever the
loss type, f-divergence or length normalisation; with LD-DPO ρ is the LD-adjusted log-ratio, as in TRL),
``logits`` = the detached quantity the loss is a function of (``> 0`` prefers chosen; documented per loss) and
``metrics["wpo_weight"]`` when ``use_weighting``. :func:`trl_reward_metrics` turns an output into TRL's
``rewards/chosen|rejected|accuracies|margins``. TRL's batch loss is ``losses.mean()``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffalign.losses.registry import register
from diffalign.losses.types import LossOutput, check_logps, check_positive

TRL_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16 rejects a non-default f-divergence for any other loss type (DPOTrainer.__init__).
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
_SMOOTHING_LOSS_TYPES = frozenset({"exo_pair", "robust", "aot", "aot_unpaired"})
_SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})

TENSOR_INPUTS: tuple[str, ...] = (  # every tensor keyword of the trl_* losses
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "policy_chosen_token_logps",
    "policy_rejected_token_logps",
    "chosen_mask",
    "rejected_mask",
    "reference_chosen_token_logps",
    "reference_rejected_token_logps",
    "chosen_lengths",
    "rejected_lengths",
    "chosen_log_sum_sq_probs",
    "rejected_log_sum_sq_probs",
)


# --------------------------------------------------------------------------------------------- input preparation


@dataclass
class _Prepared:
    a_w: torch.Tensor  # policy log-likelihoods (LD-adjusted when ld_alpha is set)
    a_l: torch.Tensor
    b_w: torch.Tensor  # reference, detached
    b_l: torch.Tensor
    len_w: torch.Tensor | None  # completion lengths (clamped ≥ 1), or None
    len_l: torch.Tensor | None
    sft_num: torch.Tensor  # Σ over the batch of raw chosen log-probs (not LD-adjusted, as TRL's sft term)
    sft_den: torch.Tensor  # number of chosen completion tokens in the batch
    weights: torch.Tensor | None  # WPO w(y_w)·w(y_l), detached


def _check_tokens(name: str, key: str, x: torch.Tensor, mask: torch.Tensor | None, mask_key: str) -> torch.Tensor:
    """Validate a ``(B, T)`` per-token tensor and its mask; return the mask as the tensor's dtype (0/1)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"losses.{name}: `{key}` must be a floating tensor of shape (B, T) (per-token log-probs), got {got}."
        )
    if mask is None:
        raise ValueError(f"losses.{name}: `{key}` needs `{mask_key}` of the same shape (1 on completion tokens).")
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"losses.{name}: `{mask_key}` must have the shape of `{key}` {tuple(x.shape)}, got {got}.")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"losses.{name}: `{mask_key}` must be bool or 0/1.")
    return mask.to(device=x.device, dtype=x.dtype)


def _ld_sum(tokens: torch.Tensor, mask: torch.Tensor, shared: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Masked sum over tokens; with ``ld_alpha`` the tokens after the first ``shared`` completion tokens count α×."""
    if ld_alpha is None:
        return (tokens * mask).sum(dim=1)
    pos = mask.cumsum(dim=1)
    shared_mask = (pos > 0) & (pos <= shared.unsqueeze(1)) & mask.bool()
    tail_mask = (pos > shared.unsqueeze(1)) & mask.bool()
    return (tokens * shared_mask).sum(dim=1) + ld_alpha * (tokens * tail_mask).sum(dim=1)


def ld_adjusted_logps(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ld_alpha: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sums of ``(B, T)`` per-token log-probs as the LD-DPO losses here take them: tokens past the
    shorter completion's length count ``ld_alpha``× (plain sums for ``None``). This is what precomputed reference
    columns must hold when a loss uses ``ld_alpha`` (TRL's ``ref_chosen_logps`` likewise)."""
    mw, ml = chosen_mask.to(chosen_token_logps.dtype), rejected_mask.to(rejected_token_logps.dtype)
    shared = torch.minimum(mw.sum(dim=1), ml.sum(dim=1))
    return _ld_sum(chosen_token_logps, mw, shared, ld_alpha), _ld_sum(rejected_token_logps, ml, shared, ld_alpha)


def _prepare(name: str, t: dict[str, torch.Tensor | None], *, ld_alpha: float | None, use_weighting: bool) -> _Prepared:
    token_mode = t["policy_chosen_token_logps"] is not None or t["policy_rejected_token_logps"] is not None
    if token_mode:
        for key in ("policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"):
            if t[key] is not None:
                raise ValueError(
                    f"losses.{name}: pass either per-token `policy_*_token_logps` with masks or `{key}`, not both "
                    "(sums and lengths are taken from the per-token inputs)."
                )
        if t["policy_chosen_token_logps"] is None or t["policy_rejected_token_logps"] is None:
            raise ValueError(f"losses.{name}: pass both `policy_chosen_token_logps` and `policy_rejected_token_logps`.")
        pw, pl = t["policy_chosen_token_logps"], t["policy_rejected_token_logps"]
        mw = _check_tokens(name, "policy_chosen_token_logps", pw, t["chosen_mask"], "chosen_mask")
        ml = _check_tokens(name, "policy_rejected_token_logps", pl, t["rejected_mask"], "rejected_mask")
        if pw.shape[0] != pl.shape[0]:
            raise ValueError(
                f"losses.{name}: chosen and rejected per-token inputs must share the batch size B, got "
                f"{pw.shape[0]} and {pl.shape[0]}."
            )
        raw_len_w, raw_len_l = mw.sum(dim=1), ml.sum(dim=1)
        shared = torch.minimum(raw_len_w, raw_len_l)
        a_w, a_l = _ld_sum(pw, mw, shared, ld_alpha), _ld_sum(pl, ml, shared, ld_alpha)
        len_w, len_l = raw_len_w.clamp(min=1.0), raw_len_l.clamp(min=1.0)
        sft_num, sft_den = (pw * mw).sum(), mw.sum()
    else:
        if ld_alpha is not None or use_weighting:
            raise ValueError(
                f"losses.{name}: `ld_alpha` and `use_weighting` need per-token inputs "
                "(`policy_chosen_token_logps`, `policy_rejected_token_logps`, `chosen_mask`, `rejected_mask`)."
            )
        for key in ("chosen_mask", "rejected_mask", "chosen_log_sum_sq_probs", "rejected_log_sum_sq_probs"):
            if t[key] is not None:
                raise ValueError(f"losses.{name}: `{key}` is only used with per-token `policy_*_token_logps`.")
        a_w, a_l = t["policy_chosen_logps"], t["policy_rejected_logps"]
        if a_w is None or a_l is None:
            raise ValueError(
                f"losses.{name}: pass `policy_chosen_logps` and `policy_rejected_logps` (B,), or their per-token "
                "versions with masks."
            )
        check_logps(name, policy_chosen_logps=a_w, policy_rejected_logps=a_l)
        if (t["chosen_lengths"] is None) != (t["rejected_lengths"] is None):
            raise ValueError(f"losses.{name}: pass both `chosen_lengths` and `rejected_lengths`, or neither.")
        if t["chosen_lengths"] is not None:
            lens = []
            for key in ("chosen_lengths", "rejected_lengths"):
                lengths = t[key]
                if not isinstance(lengths, torch.Tensor) or lengths.shape != a_w.shape:
                    got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
                    raise ValueError(f"losses.{name}: `{key}` must be a tensor of shape {tuple(a_w.shape)}, got {got}.")
                if bool((lengths < 0).any()):
                    raise ValueError(f"losses.{name}: `{key}` must be ≥ 0 (completion-token counts).")
                lens.append(lengths.to(device=a_w.device, dtype=a_w.dtype))
            sft_num, sft_den = a_w.sum(), lens[0].sum()
            len_w, len_l = lens[0].clamp(min=1.0), lens[1].clamp(min=1.0)
        else:
            len_w = len_l = None
            sft_num, sft_den = a_w.sum(), torch.tensor(float(a_w.shape[0]), dtype=a_w.dtype, device=a_w.device)

    # Reference: sums, or per-token on the policy's masks.
    ref_tok = t["reference_chosen_token_logps"] is not None or t["reference_rejected_token_logps"] is not None
    if ref_tok:
        if not token_mode:
            raise ValueError(f"losses.{name}: per-token reference inputs need per-token policy inputs (their masks).")
        if t["reference_chosen_logps"] is not None or t["reference_rejected_logps"] is not None:
            raise ValueError(f"losses.{name}: pass the reference as sums or per token, not both.")
        rw, rl = t["reference_chosen_token_logps"], t["reference_rejected_token_logps"]
        if rw is None or rl is None:
            raise ValueError(
                f"losses.{name}: pass both `reference_chosen_token_logps` and `reference_rejected_token_logps`."
            )
        _check_tokens(name, "reference_chosen_token_logps", rw, t["chosen_mask"], "chosen_mask")
        _check_tokens(name, "reference_rejected_token_logps", rl, t["rejected_mask"], "rejected_mask")
        b_w, b_l = _ld_sum(rw.detach(), mw, shared, ld_alpha), _ld_sum(rl.detach(), ml, shared, ld_alpha)
    else:
        b_w, b_l = t["reference_chosen_logps"], t["reference_rejected_logps"]
        if b_w is None or b_l is None:
            raise ValueError(f"losses.{name}: pass `reference_chosen_logps` and `reference_rejected_logps` (B,).")
        b_w, b_l = b_w.detach(), b_l.detach()
    check_logps(
        name,
        policy_chosen_logps=a_w,
        policy_rejected_logps=a_l,
        reference_chosen_logps=b_w,
        reference_rejected_logps=b_l,
    )

    weights = None
    if use_weighting:
        sq_w, sq_l = t["chosen_log_sum_sq_probs"], t["rejected_log_sum_sq_probs"]
        if sq_w is None or sq_l is None:
            raise ValueError(
                f"losses.{name}: `use_weighting=True` (WPO) needs `chosen_log_sum_sq_probs` and "
                "`rejected_log_sum_sq_probs` (B, T): log Σ_v p_v² at each position."
            )
        _check_tokens(name, "chosen_log_sum_sq_probs", sq_w, t["chosen_mask"], "chosen_mask")
        _check_tokens(name, "rejected_log_sum_sq_probs", sq_l, t["rejected_mask"], "rejected_mask")
        with torch.no_grad():
            w_w = torch.exp(((pw - sq_w) * mw).sum(dim=1) / len_w)
            w_l = torch.exp(((pl - sq_l) * ml).sum(dim=1) / len_l)
            weights = w_w * w_l
    elif t["chosen_log_sum_sq_probs"] is not None or t["rejected_log_sum_sq_probs"] is not None:
        raise ValueError(f"losses.{name}: `*_log_sum_sq_probs` are only used with `use_weighting=True`.")
    return _Prepared(a_w, a_l, b_w, b_l, len_w, len_l, sft_num, sft_den, weights)


def f_divergence_score(
    log_ratio: torch.Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> torch.Tensor:
    """TRL 1.16's f-divergence score ``s(ρ)`` of a log-ratio (table in the module docstring; arXiv 2309.16240)."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            return log_ratio
        coef = 1.0 / (f_alpha_divergence_coef - 1.0)
        x = (f_alpha_divergence_coef - 1.0) * log_ratio
        clamp_max = 11.0 if x.dtype == torch.float16 else 80.0
        return (torch.exp(torch.clamp(x.float(), max=clamp_max)) - 1.0).to(x.dtype) * coef
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCE_TYPES}.")


def _validate(name: str, loss_types: Sequence[str], hp: dict) -> None:
    check_positive(name, beta=hp["beta"])
    if hp["f_divergence_type"] not in F_DIVERGENCE_TYPES:
        raise ValueError(
            f"losses.{name}: unknown f_divergence_type {hp['f_divergence_type']!r}; "
            f"expected one of {F_DIVERGENCE_TYPES}."
        )
    if hp["f_divergence_type"] != "reverse_kl" and not set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"losses.{name}: f_divergence_type={hp['f_divergence_type']!r} is only supported for "
            f"{sorted(F_DIVERGENCE_LOSS_TYPES)} (as in TRL 1.16), got {list(loss_types)}."
        )
    if hp["use_weighting"] and set(loss_types) & _SORTING_LOSS_TYPES:
        raise ValueError(
            f"losses.{name}: `use_weighting` (WPO) is not defined for aot / aot_unpaired (they sort pairs)."
        )
    if hp["ld_alpha"] is not None and not (0.0 <= hp["ld_alpha"] <= 1.0):
        raise ValueError(f"losses.{name}: `ld_alpha` must be in [0, 1], got {hp['ld_alpha']!r}.")
    eps = hp["label_smoothing"]
    if "exo_pair" in loss_types and not (0.0 < eps < 1.0):
        raise ValueError(f"losses.{name}: exo_pair needs 0 < label_smoothing < 1 (EXO paper: 1e-3), got {eps!r}.")
    if "robust" in loss_types and not (0.0 <= eps < 0.5):
        raise ValueError(f"losses.{name}: robust needs label_smoothing in [0, 0.5), got {eps!r}.")
    if set(loss_types) & {"aot", "aot_unpaired"} and not (0.0 <= eps <= 0.5):
        raise ValueError(f"losses.{name}: aot needs label_smoothing in [0, 0.5], got {eps!r}.")
    if "discopop" in loss_types:
        check_positive(name, discopop_tau=hp["discopop_tau"])


def _one(loss_type: str, p: _Prepared, hp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss of one TRL loss type (before WPO weighting) and its detached logit."""
    beta, eps = hp["beta"], hp["label_smoothing"]
    rho_w, rho_l = p.a_w - p.b_w, p.a_l - p.b_l
    s_w = f_divergence_score(rho_w, hp["f_divergence_type"], hp["f_alpha_divergence_coef"])
    s_l = f_divergence_score(rho_l, hp["f_divergence_type"], hp["f_alpha_divergence_coef"])
    z = beta * (s_w - s_l)
    if loss_type == "sigmoid":
        return -F.logsigmoid(z), z
    if loss_type == "hinge":
        return torch.relu(1 - z), z
    if loss_type in ("ipo", "sigmoid_norm"):
        if p.len_w is None or p.len_l is None:
            delta = s_w - s_l
        else:
            delta = s_w / p.len_w - s_l / p.len_l
        if loss_type == "ipo":
            return (delta - 1 / (2 * beta)) ** 2, beta * delta
        return -F.logsigmoid(beta * delta), beta * delta
    if loss_type == "exo_pair":
        qw, log_qw = torch.sigmoid(z), F.logsigmoid(z)
        ql, log_ql = torch.sigmoid(-z), F.logsigmoid(-z)
        return qw * (log_qw - math.log1p(-eps)) + ql * (log_ql - math.log(eps)), z
    if loss_type == "nca_pair":
        cw, cl = beta * rho_w, beta * rho_l
        return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl), cw - cl
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps), z
    if loss_type == "bco_pair":
        cw, cl = beta * rho_w, beta * rho_l
        return -F.logsigmoid(cw) - F.logsigmoid(-cl), cw - cl
    if loss_type == "sppo_hard":
        return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2, beta * (rho_w - rho_l)
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = torch.sort(p.a_w - p.a_l, dim=0)[0] - torch.sort(p.b_w - p.b_l, dim=0)[0]
        else:
            d = torch.sort(rho_w, dim=0)[0] - torch.sort(rho_l, dim=0)[0]
        return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps, beta * d
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l), beta * (rho_w - rho_l)
    if loss_type == "apo_down":
        h = beta * (rho_w - rho_l)
        return torch.sigmoid(beta * rho_w) + (1 - torch.sigmoid(h)), h
    if loss_type == "discopop":
        m = torch.sigmoid(z / hp["discopop_tau"])
        return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m, z
    if loss_type == "sft":
        return (-(p.sft_num / p.sft_den)).expand(p.a_w.shape[0]), beta * (rho_w - rho_l)
    raise ValueError(f"unknown TRL loss type {loss_type!r}; expected one of {TRL_LOSS_TYPES}.")


def _run(name: str, loss_types: Sequence[str], loss_weights: Sequence[float], tensors: dict, hp: dict) -> LossOutput:
    _validate(name, loss_types, hp)
    p = _prepare(name, tensors, ld_alpha=hp["ld_alpha"], use_weighting=hp["use_weighting"])
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    logits = None
    for loss_type, weight in zip(loss_types, loss_weights, strict=True):
        losses, lg = _one(loss_type, p, hp)
        if p.weights is not None:
            losses = losses * p.weights
        if logits is None:
            logits = lg.detach()
        if len(loss_types) > 1:
            metrics[f"loss/{loss_type}"] = losses.detach()
        total = losses * weight if total is None else total + losses * weight
    if p.weights is not None:
        metrics["wpo_weight"] = p.weights
    beta = hp["beta"]
    return LossOutput(
        losses=total,
        chosen_rewards=(beta * (p.a_w - p.b_w)).detach(),
        rejected_rewards=(beta * (p.a_l - p.b_l)).detach(),
        logits=logits,
        metrics=metrics,
    )


def trl_reward_metrics(out: LossOutput) -> dict[str, float]:
    """TRL 1.16's four reward metrics from a paired output (batch means, as ``DPOTrainer._compute_loss`` logs them).

    ``rewards/chosen = mean β·ρ_w``, ``rewards/rejected = mean β·ρ_l``, ``rewards/accuracies = mean[βρ_w > βρ_l]``,
    ``rewards/margins = mean β(ρ_w − ρ_l)``. A multi-process trainer gathers the per-sample rewards first.
    """
    if out.chosen_rewards is None or out.rejected_rewards is None:
        raise ValueError("trl_reward_metrics: the output has no chosen / rejected rewards (not a paired loss).")
    c, r = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": c.mean().item(),
        "rewards/rejected": r.mean().item(),
        "rewards/accuracies": (c > r).float().mean().item(),
        "rewards/margins": (c - r).mean().item(),
    }


# --------------------------------------------------------------------------------------------- public functions

_HP_DEFAULTS: dict[str, object] = {
    "label_smoothing": 0.0,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "discopop_tau": 0.05,
    "ld_alpha": None,
    "use_weighting": False,
}

_DOCS: dict[str, str] = {
    "sigmoid": "DPO: ``loss = −ls(β·δ)``. No label smoothing (TRL 1.16 ignores it; cDPO is "
    "``dpo(label_smoothing=ε)``). "
    "Rafailov et al. 2023 (arXiv 2305.18290). logits = β·δ.",
    "hinge": "SLiC / RSO hinge-norm: ``loss = max(0, 1 − β·δ)``. Zhao et al. 2023 (arXiv 2305.10425), Liu et al. "
    "2023 (arXiv 2309.06657). logits = β·δ.",
    "ipo": "IPO: ``loss = (δ̄ − 1/(2β))²``, ``δ̄ = s(ρ_w)/|y_w| − s(ρ_l)/|y_l|`` (per-token-averaged scores; β = τ). "
    "Azar et al. 2023 (arXiv 2310.12036, eq. 17); the length averaging is TRL's (confirmed with the IPO authors per "
    "TRL's comment). Without lengths δ̄ = δ. logits = β·δ̄.",
    "exo_pair": "EXO (pair): ``loss = σ(βδ)(ls(βδ) − log(1−ε)) + σ(−βδ)(ls(−βδ) − log ε)`` = KL(q‖p), "
    "q = (σ(βδ), σ(−βδ)), p = (1−ε, ε); needs 0 < ε (paper 1e-3, the default here; TRL errors on ε = 0). "
    "Ji et al. 2024 (arXiv 2402.00856, eq. 16). logits = β·δ.",
    "nca_pair": "NCA (pair): ``loss = −ls(βρ_w) − ½ls(−βρ_w) − ½ls(−βρ_l)`` (raw log-ratios). Chen et al. 2024 "
    "(arXiv 2402.05369). logits = β·h.",
    "robust": "Robust DPO: ``loss = [−(1−ε)ls(βδ) + ε·ls(−βδ)]/(1 − 2ε)``, ε ∈ [0, 0.5) = flip rate. Chowdhury et al. "
    "2024 (arXiv 2403.00409). Equals ``robust`` in pairwise.py at reverse_kl. logits = β·δ.",
    "bco_pair": "BCO (pair): ``loss = −ls(βρ_w) − ls(−βρ_l)`` — TRL 1.16 has **no** running-mean reward shift Δ "
    "(the paper's and TRL ≤ 0.28's). Jung et al. 2024 (arXiv 2404.04656). logits = β·h.",
    "sppo_hard": "SPPO, hard labels: ``loss = (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²``. Wu et al. 2024 (arXiv 2405.00675; "
    "the paper's soft PairRM probabilities replaced by P ∈ {0, 1}). logits = β·h.",
    "aot": "AOT (paired): ``d = sort(a_w − a_l) − sort(b_w − b_l)`` (ascending, across the batch), ``loss = "
    "−(1−ε)ls(βd) − ε·ls(−βd)``. **Batch-coupled**: loss i belongs to the i-th quantile, not to pair i; call on the "
    "whole batch. Melnyk et al. 2024 (arXiv 2406.05882). logits = β·d.",
    "aot_unpaired": "AOT (unpaired; ``aot_pair`` in TRL ≤ 0.27): ``d = sort(ρ_w) − sort(ρ_l)``, ``loss = "
    "−(1−ε)ls(βd) − ε·ls(−βd)``. **Batch-coupled** like ``trl_aot``. Melnyk et al. 2024 (arXiv 2406.05882). "
    "logits = β·d.",
    "apo_zero": "APO-zero: ``loss = (1 − σ(βρ_w)) + σ(βρ_l)``. D'Oosterlinck et al. 2024 (arXiv 2408.06266, eq. 7). "
    "logits = β·h.",
    "apo_down": "APO-down: ``loss = σ(βρ_w) + 1 − σ(β(ρ_w − ρ_l))``. D'Oosterlinck et al. 2024 (arXiv 2408.06266, "
    "eq. 8). logits = β·h.",
    "discopop": "DiscoPOP / LRML: ``z = βδ``, ``m = σ(z/τ)``, ``loss = (1−m)(−ls(z)) + m·e^{−z}``, τ = "
    "``discopop_tau`` (0.05). Chris Lu et al. 2024 (arXiv 2406.08414, eq. 5). logits = β·δ.",
    "sft": "TRL's SFT term: ``loss = −(Σ_batch Σ_t log p_t(y_w)) / (number of chosen completion tokens in the "
    "batch)``, "
    "one batch-level scalar broadcast to every pair (raw, not LD-adjusted log-probs). With sums, pass "
    "``chosen_lengths`` (then it is Σa_w/Σ|y_w|); without lengths it is ``mean(−a_w)``. **Batch-coupled**. "
    "Differs from "
    "``sft`` (per-sample −logp) and from Iterative-RPO's per-sequence NLL (arXiv 2404.19733). With "
    "``use_weighting`` pair i gets ``sft·w(y_w,i)·w(y_l,i)``: TRL 1.16 raises for B > 1 there (it multiplies in place "
    "into an expanded tensor), so only its B = 1 value is checked. logits = β·h.",
    "sigmoid_norm": "Length-normalised DPO (LN-DPO): ``loss = −ls(β·δ̄)``, δ̄ as in ``trl_ipo``. TRL's "
    "``sigmoid_norm`` (Tülu-3 / SimPO-style normalisation with a reference; no single paper). Without lengths it "
    "equals trl_sigmoid. logits = β·δ̄.",
}


def _hparams_for(loss_types: Sequence[str]) -> list[str]:
    names = ["beta"]
    if set(loss_types) & _SMOOTHING_LOSS_TYPES:
        names.append("label_smoothing")
    if set(loss_types) <= F_DIVERGENCE_LOSS_TYPES:
        names += ["f_divergence_type", "f_alpha_divergence_coef"]
    if "discopop" in loss_types:
        names.append("discopop_tau")
    names.append("ld_alpha")
    if not set(loss_types) & _SORTING_LOSS_TYPES:
        names.append("use_weighting")
    return names


def _signature(hparams: list[str], defaults: dict[str, object], leading: list[inspect.Parameter]) -> inspect.Signature:
    kw = inspect.Parameter.KEYWORD_ONLY
    params = list(leading)
    params += [inspect.Parameter(k, kw, default=None, annotation="torch.Tensor | None") for k in TENSOR_INPUTS]
    for h in hparams:
        default = inspect.Parameter.empty if h == "beta" else defaults.get(h, _HP_DEFAULTS[h])
        params.append(inspect.Parameter(h, kw, default=default))
    return inspect.Signature(params, return_annotation=LossOutput)


def _make(loss_type: str) -> Callable[..., LossOutput]:
    name = f"trl_{loss_type}"
    hparams = _hparams_for([loss_type])
    defaults = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    sig = _signature(hparams, defaults, [])

    def fn(*args: object, **kwargs: object) -> LossOutput:
        if args:
            raise TypeError(f"{name}() takes keyword arguments only")
        bound = sig.bind(**kwargs)  # TypeError on an unexpected keyword or a missing beta
        bound.apply_defaults()
        values = dict(bound.arguments)
        tensors = {k: values.pop(k) for k in TENSOR_INPUTS}
        hp = {**_HP_DEFAULTS, **values}
        return _run(name, [loss_type], [1.0], tensors, hp)

    fn.__name__ = fn.__qualname__ = name
    fn.__signature__ = sig  # type: ignore[attr-defined]
    fn.__doc__ = (
        f"TRL 1.16 ``DPOTrainer`` ``loss_type={loss_type!r}``, per example. {_DOCS[loss_type]}\n\n"
        "Source: ``trl/trainer/dpo_trainer.py`` (trl==1.16.0, ``DPOTrainer._compute_loss``). Inputs, δ = s(ρ_w) − "
        "s(ρ_l), LD-DPO / WPO options and returned rewards: see the ``diffalign.losses.dpo_family`` module docstring. "
        f"Hyper-parameters: {', '.join(hparams)}."
    )
    fn.__module__ = __name__
    return register(name, needs_reference=True, kind="paired")(fn)


trl_sigmoid = _make("sigmoid")
trl_hinge = _make("hinge")
trl_ipo = _make("ipo")
trl_exo_pair = _make("exo_pair")
trl_nca_pair = _make("nca_pair")
trl_robust = _make("robust")
trl_bco_pair = _make("bco_pair")
trl_sppo_hard = _make("sppo_hard")
trl_aot = _make("aot")
trl_aot_unpaired = _make("aot_unpaired")
trl_apo_zero = _make("apo_zero")
trl_apo_down = _make("apo_down")
trl_discopop = _make("discopop")
trl_sft = _make("sft")
trl_sigmoid_norm = _make("sigmoid_norm")

_MIX_SIG = _signature(
    ["beta", *_HP_DEFAULTS],
    {},
    [
        inspect.Parameter("loss_types", inspect.Parameter.KEYWORD_ONLY, annotation="Sequence[str]"),
        inspect.Parameter("loss_weights", inspect.Parameter.KEYWORD_ONLY, default=None),
    ],
)


def dpo_mixture(*args: object, **kwargs: object) -> LossOutput:
    """Weighted mixture of TRL 1.16 loss types: ``loss_i = Σ_k w_k·ℓ_k,i`` (TRL ``loss_type=[...]``, ``loss_weights``).

    TRL's batch loss is ``Σ_k w_k·mean_i ℓ_k,i``, which is ``losses.mean()`` here. ``loss_types`` are TRL names
    (``"sigmoid"``, ``"bco_pair"``, ``"sft"``, ...; see ``TRL_LOSS_TYPES``); ``loss_weights`` default to 1.0 each and
    must match in length. All types share one set of hyper-parameters, as in TRL (one ``label_smoothing``, one
    f-divergence — allowed only if every type supports it — one ``ld_alpha``; WPO weights multiply each term,
    including ``sft``). Examples: MPO (Wang et al. 2024, arXiv 2411.10442) ``["sigmoid", "bco_pair", "sft"]`` with
    ``[0.8, 0.2, 1.0]``; RPO ≙ ``["sigmoid", "sft"]`` with ``[1, α]`` (TRL's token-mean NLL, not the paper's
    per-sequence NLL). ``label_smoothing`` defaults to 0 as in TRL, so ``exo_pair`` needs it set.

    Source: ``trl/trainer/dpo_trainer.py`` (trl==1.16.0, ``DPOTrainer._compute_loss``). ``metrics["loss/<type>"]``
    holds each (weighted-by-WPO, unweighted-by-``loss_weights``) term; ``logits`` are those of the first type;
    rewards are ``β·ρ`` as everywhere.
    """
    if args:
        raise TypeError("dpo_mixture() takes keyword arguments only")
    bound = _MIX_SIG.bind(**kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    loss_types = values.pop("loss_types")
    loss_weights = values.pop("loss_weights")
    if isinstance(loss_types, str):
        loss_types = [loss_types]
    loss_types = list(loss_types)
    if not loss_types or any(lt not in TRL_LOSS_TYPES for lt in loss_types):
        raise ValueError(
            f"losses.dpo_mixture: loss_types must be a non-empty list of {TRL_LOSS_TYPES}, got {loss_types}."
        )
    loss_weights = [1.0] * len(loss_types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"losses.dpo_mixture: {len(loss_weights)} loss_weights for {len(loss_types)} loss_types; they must match."
        )
    tensors = {k: values.pop(k) for k in TENSOR_INPUTS}
    hp = {**_HP_DEFAULTS, **values}
    return _run("dpo_mixture", loss_types, loss_weights, tensors, hp)


dpo_mixture.__signature__ = _MIX_SIG  # type: ignore[attr-defined]
dpo_mixture = register("dpo_mixture", needs_reference=True, kind="paired")(dpo_mixture)

__all__ = [
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "TRL_LOSS_TYPES",
    "dpo_mixture",
    "f_divergence_score",
    "trl_reward_metrics",
    *(f"trl_{lt}" for lt in TRL_LOSS_TYPES),
]
