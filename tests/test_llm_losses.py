"""LLM-side objectives not in TRL's DPO trainer: closed forms computed with plain math, gradients, bad inputs, TRL."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from diffalign.losses import LossOutput, dpo, get_loss, hinge
from diffalign.losses.listwise import dmpo, dynamicpo, dynamicpo_boundary, pro
from diffalign.losses.llm_pairwise import (
    alphapo,
    alphapo_reward,
    constrained_po,
    cpo,
    irepo,
    madpo,
    madpo_weights,
    orpo,
    rpo,
    rso_hinge_norm,
    rso_rejection_sample,
    rso_sigmoid_norm,
    simpo,
)

F64 = torch.float64
LN2 = math.log(2.0)


def t(values, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def ls(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def softplus(z: float) -> float:
    return -ls(-z)


# Summed log-probs and completion lengths of three pairs (LLM convention).
A_W, A_L = [-12.0, -30.0, -8.0], [-15.0, -24.0, -8.0]
LEN_W, LEN_L = [6.0, 10.0, 4.0], [5.0, 8.0, 4.0]
B_W, B_L = [-13.0, -29.0, -8.0], [-14.0, -25.0, -8.0]


def sums() -> dict[str, torch.Tensor]:
    return {"policy_chosen_logps": t(A_W), "policy_rejected_logps": t(A_L)}


def lengths() -> dict[str, torch.Tensor]:
    return {"chosen_lengths": t(LEN_W), "rejected_lengths": t(LEN_L)}


def four() -> dict[str, torch.Tensor]:
    return {**sums(), "reference_chosen_logps": t(B_W), "reference_rejected_logps": t(B_L)}


def avg(a: list[float], n: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, n, strict=True)]


# --------------------------------------------------------------------------------------------- cDPO (existing dpo)


def test_conservative_dpo_is_dpo_label_smoothing() -> None:
    beta, eps = 0.5, 0.1
    out = dpo(**four(), beta=beta, label_smoothing=eps)
    for i in range(3):
        z = beta * ((A_W[i] - B_W[i]) - (A_L[i] - B_L[i]))
        assert out.losses[i].item() == pytest.approx(-(1 - eps) * ls(z) - eps * ls(-z), abs=1e-12)
    assert out.losses[2].item() == pytest.approx(LN2, abs=1e-12)  # equal inputs: ln 2 for every ε


def test_conservative_dpo_gradient_vanishes_at_the_smoothed_target() -> None:
    """cDPO's minimum over the logit is where σ(βh) = 1 − ε; the gradient changes sign there."""
    beta, eps = 2.0, 0.2
    z_star = math.log((1 - eps) / eps)
    for h, sign in ((z_star / beta, 0), (z_star / beta - 0.3, -1), (z_star / beta + 0.3, 1)):
        a_w = t([h]).requires_grad_(True)
        dpo(
            policy_chosen_logps=a_w,
            policy_rejected_logps=t([0.0]),
            reference_chosen_logps=t([0.0]),
            reference_rejected_logps=t([0.0]),
            beta=beta,
            label_smoothing=eps,
        ).losses.sum().backward()
        g = a_w.grad.item()
        if sign == 0:
            assert g == pytest.approx(0.0, abs=1e-12)
        else:
            assert math.copysign(1, g) == sign


# --------------------------------------------------------------------------------------------- SimPO / AlphaPO


def test_simpo_closed_form_and_length_handling() -> None:
    beta, gamma = 2.0, 0.7
    out = simpo(**sums(), **lengths(), beta=beta, gamma=gamma)
    xw, xl = avg(A_W, LEN_W), avg(A_L, LEN_L)
    for i in range(3):
        z = beta * (xw[i] - xl[i]) - gamma
        assert out.losses[i].item() == pytest.approx(-ls(z), abs=1e-12)
        assert out.logits[i].item() == pytest.approx(z, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * xw[i], abs=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(beta * xl[i], abs=1e-12)
    # Equal averages: ln(1 + e^γ); γ = 0: ln 2.
    assert out.losses[2].item() == pytest.approx(math.log1p(math.exp(gamma)), abs=1e-12)
    out0 = simpo(**sums(), **lengths(), beta=beta, gamma=0.0)
    assert out0.losses[2].item() == pytest.approx(LN2, abs=1e-12)
    # Already-averaged inputs with the flag give the same numbers.
    pre = simpo(policy_chosen_logps=t(xw), policy_rejected_logps=t(xl), beta=beta, gamma=gamma, logps_are_averaged=True)
    assert torch.allclose(pre.losses, out.losses, atol=1e-14)


def test_simpo_label_smoothing_and_gradient_sign() -> None:
    beta, gamma, eps = 1.0, 0.5, 0.2
    a_w = t([-2.0]).requires_grad_(True)
    a_l = t([-3.0]).requires_grad_(True)
    out = simpo(
        policy_chosen_logps=a_w,
        policy_rejected_logps=a_l,
        beta=beta,
        gamma=gamma,
        label_smoothing=eps,
        logps_are_averaged=True,
    )
    z = beta * 1.0 - gamma
    assert out.losses.item() == pytest.approx(-(1 - eps) * ls(z) - eps * ls(-z), abs=1e-12)
    out.losses.sum().backward()
    assert a_w.grad.item() < 0 < a_l.grad.item()  # raise the chosen, lower the rejected


def test_alphapo_closed_form_and_alpha_zero_is_simpo() -> None:
    beta, gamma, alpha = 2.5, 0.4, 0.5
    out = alphapo(**sums(), **lengths(), beta=beta, gamma=gamma, alpha=alpha)
    xw, xl = avg(A_W, LEN_W), avg(A_L, LEN_L)

    def r(x: float) -> float:
        return (1 - math.exp(x) ** (-alpha)) / alpha  # (1 − p^{−α})/α with p = e^x

    for i in range(3):
        z = beta * (r(xw[i]) - r(xl[i])) - gamma
        assert out.losses[i].item() == pytest.approx(-ls(z), abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * r(xw[i]), abs=1e-12)
    assert out.losses[2].item() == pytest.approx(math.log1p(math.exp(gamma)), abs=1e-12)
    zero = alphapo(**sums(), **lengths(), beta=beta, gamma=gamma, alpha=0.0)
    ref = simpo(**sums(), **lengths(), beta=beta, gamma=gamma)
    assert torch.allclose(zero.losses, ref.losses, atol=1e-14)
    # r(x) → x as α → 0, without cancellation.
    assert alphapo_reward(t([-0.7]), 1e-12).item() == pytest.approx(-0.7, abs=1e-9)


# --------------------------------------------------------------------------------------------- CPO (contrastive)


def test_cpo_sigmoid_on_sums_plus_nll() -> None:
    beta, eps, lam = 0.1, 0.1, 1.0
    out = cpo(**sums(), **lengths(), beta=beta, label_smoothing=eps, cpo_alpha=lam)
    for i in range(3):
        z = beta * (A_W[i] - A_L[i])  # sums, as TRL's sigmoid type
        pref = -(1 - eps) * ls(z) - eps * ls(-z)
        nll = -A_W[i] / LEN_W[i]
        assert out.losses[i].item() == pytest.approx(pref + lam * nll, abs=1e-12)
        assert out.metrics["preference_loss"][i].item() == pytest.approx(pref, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * A_W[i], abs=1e-12)
    assert out.metrics["preference_loss"][2].item() == pytest.approx(LN2, abs=1e-12)
    # cpo_alpha = 0 needs no lengths and is the pure contrastive term.
    bare = cpo(**sums(), beta=beta, cpo_alpha=0.0)
    assert bare.losses.tolist() == pytest.approx([-ls(beta * (w - l)) for w, l in zip(A_W, A_L, strict=True)])
    assert "nll" not in bare.metrics
    # A caller-supplied NLL replaces −ā_w.
    given = cpo(**sums(), beta=beta, cpo_alpha=0.5, chosen_nll=t([1.0, 2.0, 3.0]))
    assert torch.allclose(given.losses, bare.losses + 0.5 * t([1.0, 2.0, 3.0]), atol=1e-14)


def test_cpo_simpo_and_alphapo_types_match_standalone_functions() -> None:
    kw = {**sums(), **lengths(), "beta": 2.0, "gamma": 0.3}
    nll = t([-a / n for a, n in zip(A_W, LEN_W, strict=True)])
    s = cpo(**kw, loss_type="simpo", cpo_alpha=0.7)
    assert torch.allclose(s.losses, simpo(**kw).losses + 0.7 * nll, atol=1e-14)
    a = cpo(**kw, loss_type="alphapo", alpha=0.3, cpo_alpha=0.0)
    assert torch.allclose(a.losses, alphapo(**kw, alpha=0.3).losses, atol=1e-14)
    assert torch.allclose(a.chosen_rewards, alphapo(**kw, alpha=0.3).chosen_rewards, atol=1e-14)


# --------------------------------------------------------------------------------------------- ORPO


def test_orpo_closed_form_both_log1mexp_branches() -> None:
    beta = 0.25
    xw, xl = [-0.1, -2.0, -0.5], [-1.5, -0.3, -0.5]  # both sides of −ln 2, and a tie
    out = orpo(policy_chosen_logps=t(xw), policy_rejected_logps=t(xl), beta=beta, logps_are_averaged=True)
    for i in range(3):
        lo = (xw[i] - xl[i]) - (math.log(1 - math.exp(xw[i])) - math.log(1 - math.exp(xl[i])))
        assert out.logits[i].item() == pytest.approx(lo, abs=1e-12)
        assert out.metrics["or_loss"][i].item() == pytest.approx(-beta * ls(lo), abs=1e-12)
        assert out.losses[i].item() == pytest.approx(-xw[i] - beta * ls(lo), abs=1e-12)
    assert out.metrics["or_loss"][2].item() == pytest.approx(beta * LN2, abs=1e-12)
    # Sums + lengths are averaged first.
    summed = orpo(**sums(), **lengths(), beta=beta)
    xw2, xl2 = avg(A_W, LEN_W), avg(A_L, LEN_L)
    lo0 = (xw2[0] - xl2[0]) - (math.log(1 - math.exp(xw2[0])) - math.log(1 - math.exp(xl2[0])))
    assert summed.losses[0].item() == pytest.approx(-xw2[0] - beta * ls(lo0), abs=1e-12)


def test_orpo_gradient_signs() -> None:
    xw = t([-0.8]).requires_grad_(True)
    xl = t([-0.9]).requires_grad_(True)
    orpo(policy_chosen_logps=xw, policy_rejected_logps=xl, beta=0.1, logps_are_averaged=True).losses.sum().backward()
    assert xw.grad.item() < 0 < xl.grad.item()


# --------------------------------------------------------------------------------------------- RPO, iREPO, RSO


def test_rpo_closed_form_and_gradient() -> None:
    beta, eta = 0.5, 0.1
    pairs = {k: v.clone().requires_grad_(True) for k, v in four().items()}
    out = rpo(**pairs, beta=beta, eta=eta)
    for i in range(3):
        h = (A_W[i] - B_W[i]) - (A_L[i] - B_L[i])
        assert out.losses[i].item() == pytest.approx(-ls(beta * h) - eta * beta * A_W[i], abs=1e-12)
    assert out.losses[2].item() == pytest.approx(LN2 - eta * beta * A_W[2], abs=1e-12)
    out.losses.sum().backward()
    for i in range(3):
        h = (A_W[i] - B_W[i]) - (A_L[i] - B_L[i])
        assert pairs["policy_chosen_logps"].grad[i].item() == pytest.approx(
            -beta * sig(-beta * h) - eta * beta, abs=1e-12
        )
    assert pairs["reference_chosen_logps"].grad is None


def test_irepo_closed_form_and_clipping() -> None:
    beta = 0.5
    p = [0.8, 0.3, 1.0]
    out = irepo(**four(), preference_probs=t(p), beta=beta, prob_clip=1e-3)
    for i in range(3):
        h = (A_W[i] - B_W[i]) - (A_L[i] - B_L[i])
        q = min(max(p[i], 1e-3), 1 - 1e-3)
        target = math.log(q / (1 - q))
        assert out.losses[i].item() == pytest.approx((beta * h - target) ** 2, abs=1e-10)
        assert out.metrics["target"][i].item() == pytest.approx(target, abs=1e-10)
    half = irepo(**four(), preference_probs=t([0.5, 0.5, 0.5]), beta=beta)
    assert half.losses[2].item() == pytest.approx(0.0, abs=1e-14)  # policy == reference, p̂ = ½


def test_rso_losses_are_dpo_and_hinge_at_gamma() -> None:
    s = rso_sigmoid_norm(**four(), gamma=0.05)
    hn = rso_hinge_norm(**four(), gamma=0.05)
    for i in range(3):
        h = (A_W[i] - B_W[i]) - (A_L[i] - B_L[i])
        assert s.losses[i].item() == pytest.approx(-ls(0.05 * h), abs=1e-12)
        assert hn.losses[i].item() == pytest.approx(max(0.0, 1 - 0.05 * h), abs=1e-12)
    assert torch.equal(s.losses, dpo(**four(), beta=0.05).losses)
    assert torch.equal(hn.losses, hinge(**four(), beta=0.05).losses)
    assert s.losses[2].item() == pytest.approx(LN2) and hn.losses[2].item() == pytest.approx(1.0)


def test_rso_sampler_limits_and_determinism() -> None:
    rewards = t([0.3, 2.0, -1.0, 1.5, 0.9])
    # β → 0: only the current best survives each round → top-k in descending order.
    assert rso_rejection_sample(rewards, beta=1e-6, num_samples=3).tolist() == [1, 3, 4]
    # β → ∞: everything is accepted on the first pass, in index order.
    assert rso_rejection_sample(rewards, beta=1e9, num_samples=4).tolist() == [0, 1, 2, 3]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = rso_rejection_sample(rewards, beta=0.5, num_samples=5, generator=g1)
    b = rso_rejection_sample(rewards, beta=0.5, num_samples=5, generator=g2)
    assert a.tolist() == b.tolist() and sorted(a.tolist()) == [0, 1, 2, 3, 4]


def test_rso_sampler_acceptance_probability() -> None:
    """Two candidates, one sample: index 0 (reward −1) is visited first and kept with probability e^{−1/β}."""
    beta, n = 1.0, 4000
    g = torch.Generator().manual_seed(0)
    hits = sum(
        rso_rejection_sample(t([-1.0, 0.0]), beta=beta, num_samples=1, generator=g).item() == 0 for _ in range(n)
    )
    p = math.exp(-1 / beta)
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------------------------- MADPO


def test_madpo_weights_closed_form() -> None:
    c_max, c_min, lam, tau = 2.0, 0.5, 1.0, 2.0
    m = [0.5, 2.0, -2.0, -3.0, 6.0, 0.0]
    w = madpo_weights(t(m), c_max=c_max, c_min=c_min, lam=lam, tau=tau).tolist()
    for mi, wi in zip(m, w, strict=True):
        c = c_min + (c_max - c_min) / (1 + (c_max - 1) / (1 - c_min) * math.exp(lam * (abs(mi) - tau)))
        expected = sig(c * mi) / sig(mi) if mi > -tau else 1.0
        assert wi == pytest.approx(expected, abs=1e-12)
    assert w[1] == pytest.approx(1.0, abs=1e-12)  # c = 1 at |m| = τ
    assert w[2] == 1.0 and w[3] == 1.0  # m ≤ −τ
    assert w[0] > 1 and w[4] < 1  # hard pairs up-weighted, easy pairs down-weighted


def test_madpo_loss_is_weighted_dpo() -> None:
    margins = t([0.5, 6.0, 1.0])
    out = madpo(**four(), reward_margins=margins, beta=0.1)
    w = madpo_weights(margins)
    for i in range(3):
        h = (A_W[i] - B_W[i]) - (A_L[i] - B_L[i])
        assert out.losses[i].item() == pytest.approx(w[i].item() * -ls(0.1 * h), abs=1e-12)
    assert out.losses[2].item() == pytest.approx(w[2].item() * LN2, abs=1e-12)
    assert torch.equal(out.metrics["weight"], w)


# --------------------------------------------------------------------------------------------- constrained PO


@pytest.mark.parametrize("variant", ["main", "clip", "easy"])
def test_constrained_po_closed_forms(variant: str) -> None:
    beta, gamma, tau, alpha = 0.1, 0.5, 2.0, 1.5
    out = constrained_po(**four(), **lengths(), beta=beta, gamma=gamma, tau=tau, alpha=alpha, variant=variant)
    pw, pl = avg(A_W, LEN_W), avg(A_L, LEN_L)
    rw, rl = avg(B_W, LEN_W), avg(B_L, LEN_L)
    for i in range(3):
        d_pi, d_ref = pw[i] - pl[i], rw[i] - rl[i]
        if variant == "main":
            z = beta * d_pi - beta * d_ref - (beta / alpha) * softplus(tau * (gamma - d_ref)) / tau
        elif variant == "clip":
            z = beta * (d_pi - max(d_ref, 0.0))
        else:
            z = beta * d_pi - beta * d_ref - gamma * (1 / rw[i] + 1 / rl[i])
        assert out.losses[i].item() == pytest.approx(-ls(z), abs=1e-12)
        assert out.logits[i].item() == pytest.approx(z, abs=1e-12)
        assert out.metrics["undesirable"][i].item() == float(d_ref < d_pi < 0)
    if variant == "clip":
        assert out.losses[2].item() == pytest.approx(LN2, abs=1e-12)  # policy == reference, δ_ref = 0


def test_constrained_po_undesirable_metric() -> None:
    # δ_π = −0.1 (prefers y_l), δ_ref = −0.5 → DPO margin positive, yet the policy still prefers y_l.
    out = constrained_po(
        policy_chosen_logps=t([-1.1]),
        policy_rejected_logps=t([-1.0]),
        reference_chosen_logps=t([-1.5]),
        reference_rejected_logps=t([-1.0]),
        logps_are_averaged=True,
    )
    assert out.metrics["undesirable"].item() == 1.0


# --------------------------------------------------------------------------------------------- PRO


def test_pro_closed_form_with_reward_temperatures() -> None:
    a = [[-6.0, -9.0, -4.0], [-2.0, -2.5, -8.0]]
    n_tok = [[3.0, 3.0, 1.0], [2.0, 1.0, 4.0]]
    r = [[2.0, 1.0, -0.5], [0.9, 0.9, 0.1]]
    lam = 2.0
    out = pro(policy_logps=t(a), lengths=t(n_tok), rewards=t(r), sft_weight=lam)
    for b in range(2):
        s = [x / y for x, y in zip(a[b], n_tok[b], strict=True)]
        total = 0.0
        for k in range(2):
            taus = {i: r[b][k] - r[b][i] for i in range(k + 1, 3)}
            tkk = max(taus.values())
            inner = 1e-10 + math.exp(tkk * s[k]) + sum(math.exp(taus[i] * s[i]) for i in taus)
            total += math.log(inner) - tkk * s[k]
        assert out.metrics["ranking_loss"][b].item() == pytest.approx(total, abs=1e-12)
        assert out.losses[b].item() == pytest.approx(total + lam * 4 * -a[b][0], abs=1e-12)
        assert out.logits[b].item() == pytest.approx(s[0] - max(s[1:]), abs=1e-12)


def test_pro_two_responses_and_no_rewards() -> None:
    # n = 2, unit temperatures, equal scores s: log(1e−10 + 2e^s) − s = ln(2 + 1e−10·e^{−s}) ≈ ln 2.
    out = pro(policy_logps=t([[-3.0, -3.0]]), sft_weight=0.0)
    assert out.losses.item() == pytest.approx(math.log(2 + 1e-10 * math.exp(3.0)), abs=1e-14)
    assert out.losses.item() == pytest.approx(LN2, abs=1e-8)
    # n = 2 with rewards: ≈ softplus(τ(s² − s¹)), τ = r¹ − r²; plus λ(n − 1)²·(−a¹).
    out = pro(policy_logps=t([[-1.0, -2.0]]), rewards=t([[3.0, 1.0]]), sft_weight=0.5)
    exact = math.log(1e-10 + math.exp(-2.0) + math.exp(-4.0)) + 2.0
    assert out.losses.item() == pytest.approx(exact + 0.5 * 1.0, abs=1e-14)
    assert out.losses.item() == pytest.approx(softplus(2.0 * (-2.0 + 1.0)) + 0.5, abs=1e-8)


def test_pro_gradient_pushes_best_up_and_rest_down() -> None:
    logps = t([[-2.0, -1.5, -1.0]]).requires_grad_(True)
    pro(policy_logps=logps, sft_weight=0.0).losses.sum().backward()
    g = logps.grad[0]
    assert g[0] < 0 and g[2] > 0


# --------------------------------------------------------------------------------------------- DMPO / DynamicPO


def test_dmpo_closed_form_and_single_negative_is_dpo() -> None:
    beta = 0.7
    out = dmpo(
        policy_chosen_logps=t([-1.0]),
        policy_rejected_logps=t([[-2.0, -3.0]]),
        reference_chosen_logps=t([-1.5]),
        reference_rejected_logps=t([[-2.5, -2.0]]),
        beta=beta,
    )
    z = beta * 0.5 - beta / 2 * ((-2.0 + 2.5) + (-3.0 + 2.0))
    assert out.losses.item() == pytest.approx(-ls(z), abs=1e-12)
    one = dmpo(
        policy_chosen_logps=t(A_W),
        policy_rejected_logps=t(A_L)[:, None],
        reference_chosen_logps=t(B_W),
        reference_rejected_logps=t(B_L)[:, None],
        beta=beta,
    )
    assert torch.allclose(one.losses, dpo(**four(), beta=beta).losses, atol=1e-14)


def _dyn_beta(beta: float, d1: float, d2: float, margin: float = 2.0) -> float:
    return beta * (1 + 0.5 * math.tanh((d1 - d2 - margin) / (abs(d1) + abs(d2))))


def test_dynamicpo_with_boundary_negatives() -> None:
    beta = 1.0
    a_w, a_l = -2.0, [-1.5, -2.0, -4.0, -6.0]  # boundary: a_l ≥ a_w → indices 0, 1
    b_w, b_l = -2.2, [-1.0, -2.5, -3.0, -5.0]
    out = dynamicpo(
        policy_chosen_logps=t([a_w]),
        policy_rejected_logps=t([a_l]),
        reference_chosen_logps=t([b_w]),
        reference_rejected_logps=t([b_l]),
        beta=beta,
    )
    easy = (a_l[2] + a_l[3]) / 2
    z = 0.0
    for j in (0, 1):
        bj = _dyn_beta(beta, a_w - a_l[j], a_l[j] - easy)
        z += bj * ((a_w - b_w) - (a_l[j] - b_l[j]))
    z /= 2
    assert out.losses.item() == pytest.approx(-ls(z), abs=1e-12)
    assert out.metrics["num_boundary"].item() == 2


def test_dynamicpo_kmeans_fallback_and_all_boundary() -> None:
    a_l = [-1.0, -1.1, -5.0, -9.0, -9.2]  # none ≥ a_w = 0 → top 3-means cluster {−1, −1.1}
    mask = dynamicpo_boundary(t([0.0]), t([a_l]))
    assert mask.tolist() == [[True, True, False, False, False]]
    out = dynamicpo(
        policy_chosen_logps=t([0.0]),
        policy_rejected_logps=t([a_l]),
        reference_chosen_logps=t([0.0]),
        reference_rejected_logps=t([[0.0] * 5]),
        beta=0.5,
    )
    easy = (-5.0 - 9.0 - 9.2) / 3
    z = sum(_dyn_beta(0.5, -a, a - easy) * (0.0 - a) for a in a_l[:2]) / 2
    assert out.losses.item() == pytest.approx(-ls(z), abs=1e-12)
    # Every negative is a boundary one: discriminative := boundary.
    al2 = [0.5, 1.0]
    out2 = dynamicpo(
        policy_chosen_logps=t([0.0]),
        policy_rejected_logps=t([al2]),
        reference_chosen_logps=t([0.0]),
        reference_rejected_logps=t([[0.0, 0.0]]),
        beta=1.0,
    )
    easy2 = sum(al2) / 2
    z2 = sum(_dyn_beta(1.0, -a, a - easy2) * (0.0 - a) for a in al2) / 2
    assert out2.losses.item() == pytest.approx(-ls(z2), abs=1e-12)


def test_dynamicpo_gradient_treats_dynamic_betas_as_constants() -> None:
    a_w = t([-2.0]).requires_grad_(True)
    a_l = t([[-1.5, -2.0, -4.0, -6.0]]).requires_grad_(True)
    b_w, b_l = -2.2, [-1.0, -2.5, -3.0, -5.0]
    out = dynamicpo(
        policy_chosen_logps=a_w,
        policy_rejected_logps=a_l,
        reference_chosen_logps=t([b_w]),
        reference_rejected_logps=t([b_l]),
        beta=1.0,
    )
    out.losses.sum().backward()
    al = [-1.5, -2.0, -4.0, -6.0]
    easy = (al[2] + al[3]) / 2
    betas = [_dyn_beta(1.0, -2.0 - al[j], al[j] - easy) for j in (0, 1)]
    s = sig(-out.logits.item())
    # d/da_w = −σ(−z)·mean_j β_j; d/da_{l_j} = +σ(−z)·β_j/|B| on boundary negatives, 0 elsewhere.
    assert a_w.grad.item() == pytest.approx(-s * sum(betas) / 2, abs=1e-12)
    assert a_l.grad[0].tolist() == pytest.approx([s * betas[0] / 2, s * betas[1] / 2, 0.0, 0.0], abs=1e-12)


def test_dynamicpo_equal_inputs_is_ln2() -> None:
    x = t([[-1.0, -2.0, -3.0]])
    out = dynamicpo(
        policy_chosen_logps=t([-1.5]),
        policy_rejected_logps=x,
        reference_chosen_logps=t([-1.5]),
        reference_rejected_logps=x.clone(),
    )
    assert out.losses.item() == pytest.approx(LN2, abs=1e-12)


# --------------------------------------------------------------------------------------------- gradients, registry


def _cases() -> dict[str, tuple[Callable[..., LossOutput], dict, list[str]]]:
    g = torch.Generator().manual_seed(5)
    p = {
        k: -torch.rand(4, generator=g, dtype=F64) * 3 - 0.1
        for k in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    }
    pol = ["policy_chosen_logps", "policy_rejected_logps"]
    free = {k: p[k] for k in pol}
    lens = {"chosen_lengths": t([3.0, 5.0, 2.0, 7.0]), "rejected_lengths": t([4.0, 4.0, 6.0, 1.0])}
    neg = {
        "policy_chosen_logps": p["policy_chosen_logps"],
        "policy_rejected_logps": -torch.rand(4, 3, generator=g, dtype=F64) * 3,
        "reference_chosen_logps": p["reference_chosen_logps"],
        "reference_rejected_logps": -torch.rand(4, 3, generator=g, dtype=F64) * 3,
    }
    return {
        "simpo": (simpo, {**free, **lens, "beta": 2.0, "label_smoothing": 0.1}, pol),
        "alphapo": (alphapo, {**free, **lens, "beta": 2.0, "alpha": 0.4}, pol),
        "cpo": (cpo, {**free, **lens, "beta": 0.5, "loss_type": "simpo", "alpha": 0.2}, pol),
        "orpo": (orpo, {**free, "beta": 0.3, "logps_are_averaged": True}, pol),
        "rpo": (rpo, {**p, "beta": 0.5}, pol),
        "irepo": (irepo, {**p, "preference_probs": t([0.2, 0.6, 0.9, 0.5]), "beta": 0.5}, pol),
        "rso_sigmoid_norm": (rso_sigmoid_norm, {**p, "gamma": 0.5}, pol),
        "rso_hinge_norm": (rso_hinge_norm, {**p, "gamma": 0.5}, pol),
        "madpo": (madpo, {**p, "reward_margins": t([0.3, 1.0, -3.0, 4.0]), "beta": 0.7}, pol),
        "constrained_po": (constrained_po, {**p, **lens, "beta": 0.5}, pol),
        "pro": (
            pro,
            {
                "policy_logps": -torch.rand(2, 4, generator=g, dtype=F64) * 4,
                "lengths": t([[2.0, 3.0, 1.0, 5.0], [4.0, 1.0, 2.0, 2.0]]),
                "rewards": t([[3.0, 2.0, 1.5, 0.0], [1.0, 0.5, 0.5, -1.0]]),
            },
            ["policy_logps"],
        ),
        "dmpo": (dmpo, {**neg, "beta": 0.8}, pol),
        "dynamicpo": (dynamicpo, {**neg, "beta": 0.8}, pol),
    }


@pytest.mark.parametrize("name", sorted(_cases()))
def test_gradcheck_and_detached_extras(name: str) -> None:
    fn, kwargs, wrt = _cases()[name]
    inputs = tuple(kwargs[k].detach().clone().requires_grad_(True) for k in wrt)

    def f(*xs: torch.Tensor) -> torch.Tensor:
        return fn(**{**kwargs, **dict(zip(wrt, xs, strict=True))}).losses

    if name != "dynamicpo":  # its β_j are stop-gradient functions of the policy: see the test below
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    call = {k: (v.clone().requires_grad_(True) if k.endswith("_logps") else v) for k, v in kwargs.items()}
    out = fn(**call)
    for extra in (out.chosen_rewards, out.rejected_rewards, out.logits, *out.metrics.values()):
        assert extra is None or not extra.requires_grad
    out.losses.sum().backward()
    for k, v in call.items():
        if k.startswith("reference"):
            assert v.grad is None, k


EXPECTED = {
    "simpo": (False, "paired"),
    "alphapo": (False, "paired"),
    "cpo": (False, "paired"),
    "orpo": (False, "paired"),
    "rpo": (True, "paired"),
    "irepo": (True, "paired"),
    "rso_sigmoid_norm": (True, "paired"),
    "rso_hinge_norm": (True, "paired"),
    "madpo": (True, "paired"),
    "constrained_po": (True, "paired"),
    "pro": (False, "listwise"),
    "dmpo": (True, "listwise"),
    "dynamicpo": (True, "listwise"),
}


def test_registry_attributes() -> None:
    assert set(EXPECTED) == set(_cases())
    for name, (needs_reference, kind) in EXPECTED.items():
        fn = get_loss(name)
        assert fn.loss_name == name and fn.needs_reference is needs_reference and fn.kind == kind
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in inspect.signature(fn).parameters.values())


# --------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="pass `chosen_lengths` and `rejected_lengths`"):
        simpo(**sums(), beta=1.0)
    with pytest.raises(ValueError, match="both `chosen_lengths` and `rejected_lengths`"):
        orpo(**sums(), chosen_lengths=t(LEN_W))
    with pytest.raises(ValueError, match="logps_are_averaged=True"):
        alphapo(**sums(), **lengths(), beta=1.0, alpha=0.1, logps_are_averaged=True)
    with pytest.raises(ValueError, match="`rejected_lengths` must be > 0"):
        simpo(**sums(), chosen_lengths=t(LEN_W), rejected_lengths=t([1.0, 0.0, 2.0]), beta=1.0)
    with pytest.raises(ValueError, match="`chosen_lengths` must be a tensor of shape \\(3,\\)"):
        simpo(**sums(), chosen_lengths=t([1.0]), rejected_lengths=t(LEN_L), beta=1.0)
    with pytest.raises(ValueError, match="loss_type"):
        cpo(**sums(), loss_type="ipo", cpo_alpha=0.0)
    with pytest.raises(ValueError, match="pass `chosen_lengths`"):
        cpo(**sums())  # NLL term needs averages
    with pytest.raises(ValueError, match="`cpo_alpha` must be >= 0"):
        cpo(**sums(), cpo_alpha=-1.0)
    with pytest.raises(ValueError, match="must be <= 0"):
        orpo(policy_chosen_logps=t([0.1]), policy_rejected_logps=t([-1.0]), logps_are_averaged=True)
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        simpo(**sums(), **lengths(), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        cpo(**sums(), cpo_alpha=0.0, label_smoothing=0.6)
    with pytest.raises(ValueError, match="`preference_probs` must lie in \\[0, 1\\]"):
        irepo(**four(), preference_probs=t([0.5, 1.5, 0.5]), beta=1.0)
    with pytest.raises(ValueError, match="`preference_probs` has shape \\(2,\\)"):
        irepo(**four(), preference_probs=t([0.5, 0.5]), beta=1.0)
    with pytest.raises(ValueError, match="c_min < 1 < c_max"):
        madpo_weights(t([0.1]), c_min=1.5)
    with pytest.raises(ValueError, match="`variant`"):
        constrained_po(**four(), **lengths(), variant="hard")
    with pytest.raises(ValueError, match="num_samples"):
        rso_rejection_sample(t([0.0, 1.0]), num_samples=3)
    with pytest.raises(ValueError, match="1-D"):
        rso_rejection_sample(t([[0.0, 1.0]]), num_samples=1)
    with pytest.raises(ValueError, match="non-increasing"):
        pro(policy_logps=t([[-1.0, -2.0]]), rewards=t([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="n >= 2"):
        pro(policy_logps=t([[-1.0]]))
    with pytest.raises(ValueError, match="`lengths` must be > 0"):
        pro(policy_logps=t([[-1.0, -2.0]]), lengths=t([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="rows"):
        dynamicpo(
            policy_chosen_logps=t([0.0, 0.0]),
            policy_rejected_logps=t([[0.0, 0.0]]),
            reference_chosen_logps=t([0.0, 0.0]),
            reference_rejected_logps=t([[0.0, 0.0]]),
        )
    with pytest.raises(TypeError, match="unexpected keyword"):
        simpo(**sums(), **lengths(), beta=1.0, temperature=1.0)


# --------------------------------------------------------------------------------------------- TRL parity (optional)


def _cpo_stub(**attrs) -> SimpleNamespace:
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **attrs)


@pytest.mark.parametrize(
    ("loss_type", "alpha", "eps"),
    [("sigmoid", 0.0, 0.0), ("sigmoid", 0.0, 0.2), ("sigmoid", 0.3, 0.0), ("simpo", 0.0, 0.1), ("simpo", 0.4, 0.0)],
)
def test_cpo_simpo_alphapo_match_trl(loss_type: str, alpha: float, eps: float) -> None:
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 0.3, 0.6
    stub = _cpo_stub(alpha=alpha, beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=gamma)
    # TRL receives summed log-probs for sigmoid and per-token averages for simpo; feed it exactly that.
    if loss_type == "sigmoid":
        xw, xl = t(A_W), t(A_L)
    else:
        xw, xl = t(avg(A_W, LEN_W)), t(avg(A_L, LEN_L))
    trl_losses, trl_cr, trl_rr = CPOTrainer.cpo_loss(stub, xw, xl)
    ours = cpo(
        **sums(),
        **lengths(),
        beta=beta,
        loss_type=loss_type,
        alpha=alpha,
        gamma=gamma,
        label_smoothing=eps,
        cpo_alpha=0.0,
    )
    assert torch.allclose(ours.losses, trl_losses.to(F64), atol=1e-6)
    assert torch.allclose(ours.chosen_rewards, trl_cr.to(F64), atol=1e-6)
    assert torch.allclose(ours.rejected_rewards, trl_rr.to(F64), atol=1e-6)
    if loss_type == "simpo" and alpha == 0:
        standalone = simpo(**sums(), **lengths(), beta=beta, gamma=gamma, label_smoothing=eps)
        assert torch.allclose(standalone.losses, trl_losses.to(F64), atol=1e-6)
    if loss_type == "simpo" and alpha != 0:
        standalone = alphapo(**sums(), **lengths(), beta=beta, gamma=gamma, alpha=alpha)
        assert torch.allclose(standalone.losses, trl_losses.to(F64), atol=1e-6)


def test_orpo_matches_trl_odds_ratio_loss() -> None:
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.2
    xw, xl = t([-0.1, -2.0, -0.5]), t([-1.5, -0.3, -0.5])
    stub = _cpo_stub(beta=beta)
    result = ORPOTrainer.odds_ratio_loss(stub, xw, xl)
    trl_losses, trl_cr, trl_rr = result[0], result[1], result[2]
    ours = orpo(policy_chosen_logps=xw, policy_rejected_logps=xl, beta=beta, logps_are_averaged=True)
    assert torch.allclose(-ours.metrics["or_loss"], trl_losses.to(F64), atol=1e-6)  # TRL returns β·ls(LO)
    assert torch.allclose(ours.chosen_rewards, trl_cr.to(F64), atol=1e-6)
    assert torch.allclose(ours.rejected_rewards, trl_rr.to(F64), atol=1e-6)
