"""Loss core: hand-computed test vectors, closed forms, independent re-implementations, gradients, registry."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from diffalign.losses import (
    LOSSES,
    LossOutput,
    UnknownLossError,
    dpo,
    get_loss,
    hinge,
    ipo,
    kto,
    mapo,
    mapo_score,
    poly_dpo,
    robust,
    sft,
)

F64 = torch.float64
LN2 = math.log(2.0)


def t(values: list[float], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def logp_from_mse(mse: list[float]) -> torch.Tensor:
    """The diffusion adapters' convention, logp = −0.5·MSE, in float64."""
    return -0.5 * t(mse)


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# Hand-computed vectors (docs/methods/offline-dpo.md): pair 1 and pair 2 MSEs (policy / reference, winner / loser).
L_W, L_L = [0.1000, 0.2000], [0.1002, 0.1999]
R_W, R_L = [0.1001, 0.2000], [0.1001, 0.2000]


def section8_pairs() -> dict[str, torch.Tensor]:
    return {
        "policy_chosen_logps": logp_from_mse(L_W),
        "policy_rejected_logps": logp_from_mse(L_L),
        "reference_chosen_logps": logp_from_mse(R_W),
        "reference_rejected_logps": logp_from_mse(R_L),
    }


def random_pairs(n: int = 5, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"]
    return {k: scale * torch.randn(n, generator=g, dtype=F64) for k in keys}


# ------------------------------------------------------------------------------------ hand-computed vectors


def test_dpo_section8_vectors() -> None:
    out = dpo(**section8_pairs(), beta=5000.0)
    assert out.logits.tolist() == pytest.approx([0.5, -0.25], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([0.474077, 0.825939], abs=1e-6)
    assert out.losses.mean().item() == pytest.approx(0.650008, abs=1e-6)
    assert (out.logits > 0).double().mean().item() == 0.5
    # TRL-style rewards: β·(policy − reference) per side.
    assert out.chosen_rewards.tolist() == pytest.approx([5000 * 0.5 * 0.0001, 0.0], abs=1e-9)
    assert out.rejected_rewards.tolist() == pytest.approx([-5000 * 0.5 * 0.0001, 5000 * 0.5 * 0.0001], abs=1e-9)


def test_dpo_matches_original_and_diffusers_scripts_on_random_mses() -> None:
    """Independent transcription of Diffusion-DPO (½β, original) and diffusers' SD script (no ½, β/2)."""
    rng = np.random.default_rng(3)
    lw, ll, rw, rl = (rng.uniform(0.05, 0.3, size=7) for _ in range(4))
    beta = 5000.0
    s_original = -0.5 * beta * ((lw - ll) - (rw - rl))
    s_diffusers = (beta / 2) * ((rw - rl) - (lw - ll))
    expected = np.logaddexp(0.0, -s_original)  # −log σ(s)
    out = dpo(
        policy_chosen_logps=-0.5 * torch.from_numpy(lw),
        policy_rejected_logps=-0.5 * torch.from_numpy(ll),
        reference_chosen_logps=-0.5 * torch.from_numpy(rw),
        reference_rejected_logps=-0.5 * torch.from_numpy(rl),
        beta=beta,
    )
    np.testing.assert_allclose(out.logits.numpy(), s_original, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out.logits.numpy(), s_diffusers, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_poly_dpo_section8_vector() -> None:
    out = poly_dpo(**section8_pairs(), beta=5000.0, alpha=1.0)
    p = sigmoid(out.logits[0].item())
    assert p == pytest.approx(0.622459, abs=1e-6)
    assert out.losses[0].item() == pytest.approx(0.851618, abs=1e-6)
    # −log p + α(1 − p) for pair 2 as well, from the formula.
    p2 = sigmoid(-0.25)
    assert out.losses[1].item() == pytest.approx(-math.log(p2) + (1 - p2), abs=1e-12)


def test_mapo_section8_vectors() -> None:
    pairs = section8_pairs()
    out = mapo(policy_chosen_logps=pairs["policy_chosen_logps"], policy_rejected_logps=pairs["policy_rejected_logps"])
    assert out.metrics["win_score"][0].item() == pytest.approx(0.9752083, abs=1e-7)
    assert out.metrics["lose_score"][0].item() == pytest.approx(0.9751592, abs=1e-7)
    assert out.logits.tolist() == pytest.approx([0.049166, -0.024167], abs=1e-6)
    assert out.losses[0].item() == pytest.approx(0.166887, abs=1e-6)
    assert out.losses.mean().item() == pytest.approx(0.218709, abs=1e-6)
    assert out.metrics["margin_loss"][0].item() == pytest.approx(-0.1 * log_sigmoid(out.logits[0].item()), abs=1e-12)


def test_mapo_matches_compute_loss_transcription_on_random_mses() -> None:
    """MaPO's ``compute_loss`` written out naively in numpy: mean(L^w) − β·mean(log σ(T·(g_w − g_l)))."""
    rng = np.random.default_rng(11)
    lw, ll = rng.uniform(0.01, 1.5, size=9), rng.uniform(0.01, 1.5, size=9)
    beta, snr, steps = 0.2, 0.7, 500
    g = lambda mse: snr * mse / (np.exp(snr * mse) - 1)  # noqa: E731
    ratio = -np.logaddexp(0.0, -steps * (g(lw) - g(ll)))
    expected_batch = lw.mean() - beta * ratio.mean()
    out = mapo(
        policy_chosen_logps=-0.5 * torch.from_numpy(lw),
        policy_rejected_logps=-0.5 * torch.from_numpy(ll),
        beta=beta,
        snr=snr,
        num_train_timesteps=steps,
    )
    np.testing.assert_allclose(out.losses.numpy(), lw - beta * ratio, rtol=1e-12)
    assert out.losses.mean().item() == pytest.approx(expected_batch, rel=1e-12)
    assert out.chosen_rewards.numpy() == pytest.approx(-0.5 * beta * lw, rel=1e-12)


def test_kto_section8_vector_with_documented_beta() -> None:
    """Diffusion-KTO β = 1000 on r = L_ref − L_θ equals beta = 2000 on r = logp_θ − logp_ref."""
    out = kto(
        policy_logps=logp_from_mse([0.1000, 0.1002]),
        reference_logps=logp_from_mse([0.1001, 0.1001]),
        labels=torch.tensor([1, 0]),
        beta=2000.0,
    )
    assert out.losses.tolist() == pytest.approx([0.475021, 0.475021], abs=1e-6)
    assert out.losses.tolist() == pytest.approx([1 - sigmoid(0.1)] * 2, abs=1e-12)
    assert out.metrics["kl"].tolist() == [0.0, 0.0]  # mean r = 0 → z₀ = clamp(0, 0)
    assert out.logits.tolist() == pytest.approx([0.1, 0.1], abs=1e-9)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1], abs=1e-9)
    assert out.rejected_rewards is None


def test_kto_matches_diffusion_kto_transcription_with_positive_reference_point() -> None:
    rng = np.random.default_rng(5)
    l_theta, l_ref = rng.uniform(0.05, 0.3, size=8), rng.uniform(0.05, 0.3, size=8)
    l_theta[:5] -= 0.02  # policy better on most samples → mean reward > 0, the clamp is inactive
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    beta_paper, w_d, w_u = 1000.0, 1.3, 0.7
    r_paper = l_ref - l_theta
    z0 = max(r_paper.mean(), 0.0)
    assert z0 > 0
    h = 1 / (1 + np.exp(-(2 * y - 1) * beta_paper * (r_paper - z0)))
    expected = np.where(y == 1, w_d, w_u) * (1 - h)
    out = kto(
        policy_logps=-0.5 * torch.from_numpy(l_theta),
        reference_logps=-0.5 * torch.from_numpy(l_ref),
        labels=torch.from_numpy(y.astype(bool)),
        beta=2 * beta_paper,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )
    np.testing.assert_allclose(out.losses.numpy(), expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(out.metrics["kl"].numpy(), np.full(8, z0 / 2), rtol=1e-12)


def test_kto_reference_point_overrides_batch_mean_and_is_clamped() -> None:
    pol, ref = t([0.3, -0.1, 0.2]), t([0.1, 0.1, 0.1])  # r = [0.2, −0.2, 0.1]
    labels = torch.tensor([True, False, True])
    given = kto(policy_logps=pol, reference_logps=ref, labels=labels, beta=2.0, reference_point=0.05)
    expected = [1 - sigmoid(2.0 * (0.2 - 0.05)), 1 - sigmoid(-2.0 * (-0.2 - 0.05)), 1 - sigmoid(2.0 * (0.1 - 0.05))]
    assert given.losses.tolist() == pytest.approx(expected, abs=1e-12)
    negative = kto(policy_logps=pol, reference_logps=ref, labels=labels, beta=2.0, reference_point=torch.tensor(-1.0))
    zero = [1 - sigmoid(2.0 * 0.2), 1 - sigmoid(-2.0 * -0.2), 1 - sigmoid(2.0 * 0.1)]
    assert negative.losses.tolist() == pytest.approx(zero, abs=1e-12)


# --------------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("beta", [0.1, 5000.0])
def test_values_when_policy_equals_reference(beta: float) -> None:
    g = torch.Generator().manual_seed(1)
    a_w, a_l = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    same = {
        "policy_chosen_logps": a_w,
        "policy_rejected_logps": a_l,
        "reference_chosen_logps": a_w.clone(),
        "reference_rejected_logps": a_l.clone(),
    }
    expected = {
        "dpo": [LN2] * 4,
        "robust": [LN2] * 4,
        "hinge": [1.0] * 4,
        "ipo": [(1 / (2 * beta)) ** 2] * 4,
        "poly_dpo": [LN2 + 0.5 * 0.7] * 4,
    }
    assert dpo(**same, beta=beta).losses.tolist() == pytest.approx(expected["dpo"], abs=1e-12)
    assert dpo(**same, beta=beta, label_smoothing=0.3).losses.tolist() == pytest.approx(expected["dpo"], abs=1e-12)
    assert robust(**same, beta=beta, label_smoothing=0.2).losses.tolist() == pytest.approx(
        expected["robust"], abs=1e-12
    )
    assert hinge(**same, beta=beta).losses.tolist() == pytest.approx(expected["hinge"], abs=1e-12)
    assert ipo(**same, beta=beta).losses.tolist() == pytest.approx(expected["ipo"], abs=1e-15)
    assert poly_dpo(**same, beta=beta, alpha=0.7).losses.tolist() == pytest.approx(expected["poly_dpo"], abs=1e-12)
    for fn in (dpo, robust, hinge, ipo):
        out = fn(**same, beta=beta)
        assert out.logits.abs().max().item() == 0.0
        assert out.chosen_rewards.abs().max().item() == 0.0


# Hand vectors: ρ_w = a_w − b_w = [0.2, −0.2, 0.5], ρ_l = [0.2, −1.0, −1.5], h = ρ_w − ρ_l = [0.0, 0.8, 2.0].
HAND = {
    "policy_chosen_logps": t([-1.0, -2.0, -0.5]),
    "policy_rejected_logps": t([-1.5, -1.0, -3.0]),
    "reference_chosen_logps": t([-1.2, -1.8, -1.0]),
    "reference_rejected_logps": t([-1.7, -0.0, -1.5]),
}


def test_hand_vector_margins() -> None:
    # ρ_w = [0.2, −0.2, 0.5], ρ_l = [0.2, −1.0, −1.5] → h = [0.0, 0.8, 2.0].
    out = dpo(**HAND, beta=1.0)
    assert out.logits.tolist() == pytest.approx([0.0, 0.8, 2.0], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, -0.2, 0.5], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([0.2, -1.0, -1.5], abs=1e-12)


H = [0.0, 0.8, 2.0]


def test_dpo_label_smoothing_is_conservative_dpo() -> None:
    beta, eps = 1.5, 0.1
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    assert dpo(**HAND, beta=beta, label_smoothing=eps).losses.tolist() == pytest.approx(expected, abs=1e-12)
    plain = [-log_sigmoid(beta * h) for h in H]
    assert dpo(**HAND, beta=beta).losses.tolist() == pytest.approx(plain, abs=1e-12)


def test_robust_closed_form() -> None:
    beta, eps = 2.0, 0.25
    expected = [(-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in H]
    assert robust(**HAND, beta=beta, label_smoothing=eps).losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert robust(**HAND, beta=beta).losses.tolist() == pytest.approx(dpo(**HAND, beta=beta).losses.tolist())


def test_hinge_closed_form() -> None:
    beta = 0.9
    expected = [max(0.0, 1 - beta * h) for h in H]  # [1.0, 0.28, 0.0]
    assert hinge(**HAND, beta=beta).losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_ipo_closed_form_with_and_without_lengths() -> None:
    beta = 0.5  # 1/(2β) = 1
    assert ipo(**HAND, beta=beta).losses.tolist() == pytest.approx([(h - 1.0) ** 2 for h in H], abs=1e-12)
    len_w, len_l = torch.tensor([2, 4, 5]), torch.tensor([1, 2, 3])
    rho_w, rho_l = [0.2, -0.2, 0.5], [0.2, -1.0, -1.5]
    h_bar = [rw / lw - rl / ll for rw, rl, lw, ll in zip(rho_w, rho_l, [2, 4, 5], [1, 2, 3], strict=True)]
    out = ipo(**HAND, beta=beta, chosen_lengths=len_w, rejected_lengths=len_l)
    assert out.losses.tolist() == pytest.approx([(hb - 1.0) ** 2 for hb in h_bar], abs=1e-12)
    assert out.logits.tolist() == pytest.approx([beta * hb for hb in h_bar], abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * r for r in rho_w], abs=1e-12)


def test_poly_dpo_alpha_zero_is_dpo_and_closed_form() -> None:
    beta, alpha = 1.2, -0.4
    assert poly_dpo(**HAND, beta=beta, alpha=0.0).losses.tolist() == pytest.approx(
        dpo(**HAND, beta=beta).losses.tolist(), abs=1e-12
    )
    expected = [-math.log(sigmoid(beta * h)) + alpha * (1 - sigmoid(beta * h)) for h in H]
    assert poly_dpo(**HAND, beta=beta, alpha=alpha).losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_sft_is_negative_logp() -> None:
    out = sft(policy_chosen_logps=logp_from_mse([0.1, 0.4]))
    assert out.losses.tolist() == pytest.approx([0.05, 0.2], abs=1e-15)  # ½·MSE
    assert out.chosen_rewards is None and out.rejected_rewards is None and out.logits is None


def test_large_margins_stay_finite() -> None:
    big = {k: v * 1e3 for k, v in HAND.items()}
    for fn in (dpo, robust, poly_dpo):
        out = fn(**big, beta=5000.0, **({"alpha": 1.0} if fn is poly_dpo else {}))
        assert torch.isfinite(out.losses).all()
    assert dpo(**big, beta=5000.0).losses[2].item() == 0.0  # −log σ(1e7) underflows to 0, not NaN
    swapped = {
        "policy_chosen_logps": big["policy_rejected_logps"],
        "policy_rejected_logps": big["policy_chosen_logps"],
        "reference_chosen_logps": big["reference_rejected_logps"],
        "reference_rejected_logps": big["reference_chosen_logps"],
    }
    # h = −800 → −log σ(−4e6) = 4e6 (no overflow to inf).
    assert dpo(**swapped, beta=5000.0).losses[1].item() == pytest.approx(5000.0 * 800.0, rel=1e-12)


def test_float32_in_float32_out() -> None:
    pairs = {k: v.float() for k, v in section8_pairs().items()}
    out = dpo(**pairs, beta=5000.0)
    assert out.losses.dtype == torch.float32 and out.logits.dtype == torch.float32


# --------------------------------------------------------------------------------------------- MaPO score


def test_mapo_score_is_stable_at_zero_and_matches_naive_formula() -> None:
    x = torch.tensor([0.0, 1e-8, -1e-8, 9.99e-4, 1.001e-3, -1.001e-3, 0.05, 3.0, -3.0, 60.0], dtype=F64)
    g = mapo_score(x, 1.0)
    naive = [1.0 if v == 0 else v / math.expm1(v) for v in x.tolist()]
    assert g.tolist() == pytest.approx(naive, rel=1e-14, abs=1e-300)
    x0 = torch.zeros(1, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(mapo_score(x0, 0.5).sum(), x0)
    assert grad.item() == pytest.approx(-0.25, abs=1e-15)  # d/dL g(sL) at 0 = −s/2


def test_mapo_score_has_no_overflow() -> None:
    mse = torch.tensor([1e4, -1e4, 0.0], dtype=torch.float32, requires_grad=True)
    g = mapo_score(mse, 0.5)
    assert g.tolist() == pytest.approx([0.0, 5e3, 1.0])
    (grad,) = torch.autograd.grad(g.sum(), mse)
    assert torch.isfinite(grad).all()
    assert grad.tolist() == pytest.approx([0.0, -0.5, -0.25])  # g(x) → −x as x → −∞


# --------------------------------------------------------------------------------------------- gradients


def _gradcheck_cases() -> dict[str, list[tuple[Callable[..., LossOutput], dict, list[str]]]]:
    """name → list of (fn, fixed kwargs, names of the policy inputs to differentiate)."""
    pairs = random_pairs(n=4, seed=7, scale=0.3)
    policy = ["policy_chosen_logps", "policy_rejected_logps"]
    g = torch.Generator().manual_seed(9)
    kto_pol, kto_ref = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    mse_w, mse_l = torch.rand(4, generator=g, dtype=F64) + 0.05, torch.rand(4, generator=g, dtype=F64) + 0.05
    mse_w[0] = 1e-5  # exercise the Taylor branch too
    return {
        "dpo": [(dpo, {**pairs, "beta": 2.0}, policy), (dpo, {**pairs, "beta": 2.0, "label_smoothing": 0.2}, policy)],
        "ipo": [(ipo, {**pairs, "beta": 0.7}, policy)],
        "hinge": [(hinge, {**pairs, "beta": 0.5}, policy)],
        "robust": [(robust, {**pairs, "beta": 2.0, "label_smoothing": 0.3}, policy)],
        "poly_dpo": [(poly_dpo, {**pairs, "beta": 2.0, "alpha": 1.5}, policy)],
        "mapo": [
            (
                mapo,
                {"policy_chosen_logps": -0.5 * mse_w, "policy_rejected_logps": -0.5 * mse_l, "beta": 0.3},
                policy,
            )
        ],
        "kto": [
            # z₀ is a stop-gradient constant: check with it given, and where the clamp makes it locally constant.
            (
                kto,
                {
                    "policy_logps": kto_pol,
                    "reference_logps": kto_ref,
                    "labels": labels,
                    "beta": 1.5,
                    "reference_point": 0.2,
                    "desirable_weight": 1.2,
                },
                ["policy_logps"],
            ),
            (
                kto,
                {"policy_logps": kto_pol - 5.0, "reference_logps": kto_ref, "labels": labels, "beta": 1.5},
                ["policy_logps"],
            ),
        ],
        "sft": [(sft, {"policy_chosen_logps": pairs["policy_chosen_logps"]}, ["policy_chosen_logps"])],
    }


def test_gradcheck_covers_every_registered_loss() -> None:
    assert set(_gradcheck_cases()) == diffusion_side_losses()


@pytest.mark.parametrize("name", sorted(_gradcheck_cases()))
def test_gradcheck(name: str) -> None:
    for fn, kwargs, wrt in _gradcheck_cases()[name]:
        inputs = tuple(kwargs[k].detach().clone().requires_grad_(True) for k in wrt)

        def f(*xs: torch.Tensor, fn=fn, kwargs=kwargs, wrt=wrt) -> torch.Tensor:
            return fn(**{**kwargs, **dict(zip(wrt, xs, strict=True))}).losses

        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_dpo_gradient_closed_form_and_no_gradient_to_reference() -> None:
    pairs = {k: v.clone().requires_grad_(True) for k, v in HAND.items()}
    beta = 1.5
    out = dpo(**pairs, beta=beta)
    out.losses.sum().backward()
    # d/da_w [−log σ(βh)] = −β·σ(−βh); d/da_l = +β·σ(−βh).
    expected = [-beta * sigmoid(-beta * h) for h in H]
    assert pairs["policy_chosen_logps"].grad.tolist() == pytest.approx(expected, abs=1e-12)
    assert pairs["policy_rejected_logps"].grad.tolist() == pytest.approx([-e for e in expected], abs=1e-12)
    assert pairs["reference_chosen_logps"].grad is None
    assert pairs["reference_rejected_logps"].grad is None
    for extra in (out.chosen_rewards, out.rejected_rewards, out.logits):
        assert not extra.requires_grad


def test_extras_are_detached_for_every_loss() -> None:
    for name, cases in _gradcheck_cases().items():
        for fn, kwargs, wrt in cases:
            call = {
                k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for k, v in kwargs.items()
            }
            out = fn(**call)
            assert out.losses.requires_grad, name
            for extra in (out.chosen_rewards, out.rejected_rewards, out.logits, *out.metrics.values()):
                assert extra is None or not extra.requires_grad, name
            for k, v in call.items():
                if k not in wrt and isinstance(v, torch.Tensor) and v.requires_grad:
                    out.losses.sum().backward(retain_graph=True)
                    assert v.grad is None, f"{name}: gradient reached {k}"


# --------------------------------------------------------------------------------------------- registry


EXPECTED_REGISTRY = {
    "dpo": (True, "paired"),
    "ipo": (True, "paired"),
    "hinge": (True, "paired"),
    "robust": (True, "paired"),
    "poly_dpo": (True, "paired"),
    "kto": (True, "unpaired"),
    "mapo": (False, "paired"),
    "sft": (False, "chosen_only"),
}


# the losses of the diffusion side's modules; the LLM modules' losses are checked in test_llm_losses / test_trl_parity
DIFFUSION_MODULES = ("diffalign.losses.pairwise", "diffalign.losses.reference_free")


def diffusion_side_losses() -> set[str]:
    return {name for name, fn in LOSSES.items() if fn.__module__ in DIFFUSION_MODULES}


def test_registry_names_and_attributes() -> None:
    assert diffusion_side_losses() == set(EXPECTED_REGISTRY)
    for name, (needs_reference, kind) in EXPECTED_REGISTRY.items():
        fn = get_loss(name)
        assert fn is LOSSES[name]
        assert fn.loss_name == name and fn.needs_reference is needs_reference and fn.kind == kind
        params = inspect.signature(fn).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name


@pytest.mark.parametrize(("typo", "nearest"), [("dop", "dpo"), ("poly-dpo", "poly_dpo"), ("map", "mapo")])
def test_unknown_loss_names_nearest(typo: str, nearest: str) -> None:
    with pytest.raises(UnknownLossError) as info:
        get_loss(typo)
    message = str(info.value)
    assert f"Did you mean '{nearest}'?" in message
    assert ", ".join(sorted(LOSSES)) in message
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", sorted(EXPECTED_REGISTRY))
def test_unexpected_keyword_is_type_error(name: str) -> None:
    fn, kwargs, _ = _gradcheck_cases()[name][0]
    with pytest.raises(TypeError, match="unexpected keyword"):
        fn(**kwargs, temperature=1.0)
    with pytest.raises(TypeError):
        fn(*kwargs.values())


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    pairs = section8_pairs()
    with pytest.raises(ValueError, match="`reference_rejected_logps` has shape \\(3,\\)"):
        dpo(**{**pairs, "reference_rejected_logps": t([0.0, 0.0, 0.0])}, beta=1.0)
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        dpo(**{**pairs, "policy_chosen_logps": torch.zeros(2, 4, dtype=F64)}, beta=1.0)
    with pytest.raises(TypeError, match="`policy_rejected_logps` has dtype torch.int64"):
        dpo(**{**pairs, "policy_rejected_logps": torch.tensor([1, 2])}, beta=1.0)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        sft(policy_chosen_logps=[0.1, 0.2])
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        hinge(**pairs, beta=0.0)
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        dpo(**pairs, beta=float("nan"))
    with pytest.raises(ValueError, match="label_smoothing"):
        robust(**pairs, beta=1.0, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo(**pairs, beta=1.0, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="both `chosen_lengths` and `rejected_lengths`"):
        ipo(**pairs, beta=1.0, chosen_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="`rejected_lengths` must be > 0"):
        ipo(**pairs, beta=1.0, chosen_lengths=torch.tensor([1, 2]), rejected_lengths=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="`snr` must be a finite number > 0"):
        mapo(policy_chosen_logps=t([-0.05]), policy_rejected_logps=t([-0.05]), snr=-0.5)
    with pytest.raises(ValueError, match="`labels` must be 0/1 or bool"):
        kto(policy_logps=t([0.0, 0.0]), reference_logps=t([0.0, 0.0]), labels=torch.tensor([1, 2]), beta=1.0)
    with pytest.raises(ValueError, match="`labels` must be a tensor of shape \\(2,\\)"):
        kto(policy_logps=t([0.0, 0.0]), reference_logps=t([0.0, 0.0]), labels=torch.tensor([1]), beta=1.0)
    with pytest.raises(ValueError, match="`reference_point` must be a scalar"):
        kto(
            policy_logps=t([0.0]),
            reference_logps=t([0.0]),
            labels=torch.tensor([1]),
            beta=1.0,
            reference_point=torch.zeros(2),
        )


def test_kto_reference_point_is_a_stop_gradient() -> None:
    """With mean r > 0 (clamp inactive) z₀ still carries no gradient: each loss depends only on its own sample."""
    pol = t([0.5, 0.1, 0.4]).requires_grad_(True)
    ref = t([0.0, 0.2, 0.1])  # r = [0.5, −0.1, 0.3], z₀ = 0.7/3
    labels, beta = torch.tensor([1, 0, 1]), 2.0
    out = kto(policy_logps=pol, reference_logps=ref, labels=labels, beta=beta)
    (jac,) = torch.autograd.grad(out.losses[0], pol)
    z0 = (0.5 - 0.1 + 0.3) / 3
    s = sigmoid(beta * (0.5 - z0))
    assert jac.tolist() == pytest.approx([-beta * s * (1 - s), 0.0, 0.0], abs=1e-12)
