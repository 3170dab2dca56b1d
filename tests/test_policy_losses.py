"""Policy surrogates, advantages and reward shaping: closed forms and hand loops, plus a TRL 1.16 parity tier."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from diffalign.losses.advantages import (
    best_of_k_mask,
    best_worst_advantages,
    bnpo_advantages,
    bnpo_beta_params,
    group_advantages,
    group_ranks,
    mc_grpo_advantages,
    rloo_advantages,
)
from diffalign.losses.policy import (
    clipped_policy_loss,
    flow_grpo_kl,
    flow_grpo_policy_loss,
    grpo_guard_log_ratio,
    grpo_guard_policy_loss,
    k3_kl,
)
from diffalign.losses.policy_registry import POLICY_LOSSES, PolicyStep, get_policy_loss, register_policy_loss
from diffalign.losses.registry import UnknownLossError
from diffalign.losses.reward_shaping import ches_score, ensemble_reward, lsc_reference, lsc_transform, par_reward

F64 = torch.float64
AGGS = ("grpo", "bnpo", "dr_grpo", "dapo")


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def toy_batch(seed: int = 0, b: int = 4, tt: int = 5, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, tt, generator=g, dtype=F64) * 3
    old = logps + spread * torch.randn(b, tt, generator=g, dtype=F64)
    ref = logps + 0.3 * torch.randn(b, tt, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = torch.ones(b, tt, dtype=F64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return logps, old, ref, adv, mask


def hand_aggregate(per_tok: list[list[float]], mask: list[list[float]], agg: str, max_len: int) -> float:
    """The four TRL aggregations, written with plain Python loops."""
    rows = len(per_tok)
    sums = [sum(v * m for v, m in zip(r, mr, strict=True)) for r, mr in zip(per_tok, mask, strict=True)]
    counts = [sum(mr) for mr in mask]
    if agg == "grpo":
        return sum(s / max(c, 1.0) for s, c in zip(sums, counts, strict=True)) / rows
    if agg in ("bnpo", "dapo"):
        return sum(sums) / max(sum(counts), 1.0)
    return sum(sums) / (rows * max_len)


# --------------------------------------------------------------------------------------------- clipped_policy_loss


@pytest.mark.parametrize("agg", AGGS)
def test_on_policy_loss_is_minus_aggregated_advantage(agg: str) -> None:
    logps, _, _, adv, mask = toy_batch()
    out = clipped_policy_loss(logps, None, adv, mask, aggregation=agg, max_completion_length=7)
    per_tok = [[-adv[i].item()] * logps.shape[1] for i in range(logps.shape[0])]
    expected = hand_aggregate(per_tok, mask.tolist(), agg, 7)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    if agg == "grpo":
        assert out.loss.item() == pytest.approx(-adv.mean().item(), abs=1e-12)
    assert out.metrics["ratio/mean"].item() == pytest.approx(1.0)
    assert out.metrics["ratio/std"].item() == pytest.approx(0.0)
    assert out.metrics["clip_ratio/region_mean"].item() == 0.0
    # same values when old == logps passed explicitly
    out2 = clipped_policy_loss(logps, logps.clone(), adv, mask, aggregation=agg, max_completion_length=7)
    assert out2.loss.item() == pytest.approx(expected, abs=1e-12)


def test_on_policy_gradient_is_minus_advantage_over_tokens() -> None:
    logps, _, _, adv, mask = toy_batch()
    x = logps.clone().requires_grad_(True)
    clipped_policy_loss(x, None, adv, mask, aggregation="grpo").loss.backward()
    n = mask.sum(-1, keepdim=True)
    expected = -adv.unsqueeze(1) * mask / n / logps.shape[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("agg", AGGS)
def test_token_clipping_against_hand_loop(agg: str) -> None:
    logps, old, _, adv, mask = toy_batch(seed=1, spread=0.6)
    eps_lo, eps_hi = 0.2, 0.28
    out = clipped_policy_loss(
        logps, old, adv, mask, epsilon_low=eps_lo, epsilon_high=eps_hi, aggregation=agg, max_completion_length=6
    )
    per_tok, lows, highs = [], [], []
    for i in range(logps.shape[0]):
        row = []
        a = adv[i].item()
        for j in range(logps.shape[1]):
            r = math.exp(logps[i, j].item() - old[i, j].item())
            rc = min(max(r, 1 - eps_lo), 1 + eps_hi)
            row.append(-min(r * a, rc * a))
            if mask[i, j] > 0:
                lows.append(float(r < 1 - eps_lo and a < 0))
                highs.append(float(r > 1 + eps_hi and a > 0))
        per_tok.append(row)
    assert out.loss.item() == pytest.approx(hand_aggregate(per_tok, mask.tolist(), agg, 6), abs=1e-12)
    assert out.metrics["clip_ratio/low_mean"].item() == pytest.approx(sum(lows) / len(lows))
    assert out.metrics["clip_ratio/high_mean"].item() == pytest.approx(sum(highs) / len(highs))
    region = [max(lo, hi) for lo, hi in zip(lows, highs, strict=True)]
    assert out.metrics["clip_ratio/region_mean"].item() == pytest.approx(sum(region) / len(region))


def test_clip_regions_single_token() -> None:
    """r above 1+ε with A>0 and r below 1−ε with A<0 are flat (zero gradient); the other sides are not."""
    eps = 0.2
    cases = [  # (log r, A, clipped?)
        (math.log(1.5), 1.0, True),
        (math.log(1.5), -1.0, False),
        (math.log(0.5), -1.0, True),
        (math.log(0.5), 1.0, False),
        (math.log(1.1), 1.0, False),
    ]
    for log_r, a, clipped in cases:
        x = torch.tensor([[log_r]], dtype=F64, requires_grad=True)
        out = clipped_policy_loss(x, torch.zeros(1, 1, dtype=F64), t([a]), epsilon_low=eps, aggregation="bnpo")
        out.loss.backward()
        r = math.exp(log_r)
        expected = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
        assert out.loss.item() == pytest.approx(expected)
        assert (x.grad.abs().item() == 0.0) == clipped
        assert out.metrics["clip_ratio/region_mean"].item() == float(clipped)


def test_gspo_sequence_ratio() -> None:
    logps, old, _, adv, mask = toy_batch(seed=2, spread=0.3)
    out = clipped_policy_loss(logps, old, adv, mask, aggregation="grpo", importance_sampling_level="sequence")
    total, ratios = 0.0, []
    for i in range(logps.shape[0]):
        lr = [(logps[i, j] - old[i, j]).item() for j in range(logps.shape[1]) if mask[i, j] > 0]
        r = math.exp(sum(lr) / len(lr))
        ratios.append(r)
        a = adv[i].item()
        total += -min(r * a, min(max(r, 0.8), 1.2) * a)
    assert out.loss.item() == pytest.approx(total / logps.shape[0], abs=1e-12)
    assert out.metrics["ratio/mean"].item() == pytest.approx(statistics.fmean(ratios))
    assert out.metrics["ratio/std"].item() == pytest.approx(statistics.pstdev(ratios))


def test_k3_kl_properties() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    k = k3_kl(a, b)
    assert (k >= 0).all()
    assert k3_kl(a, a).abs().max().item() == 0.0
    d = (b - a)[0].item()
    assert k[0].item() == pytest.approx(math.exp(d) - d - 1)


def test_kl_term_and_bias_correction() -> None:
    logps, _, ref, adv, mask = toy_batch(seed=4)
    beta = 0.04
    k3 = [
        [math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(a, b, strict=True)]
        for a, b in zip(logps.tolist(), ref.tolist(), strict=True)
    ]
    per_tok = [[-adv[i].item() + beta * k3[i][j] for j in range(logps.shape[1])] for i in range(logps.shape[0])]
    grads = []
    for corr in (True, False):
        x = logps.clone().requires_grad_(True)
        out = clipped_policy_loss(
            x, None, adv, mask, aggregation="bnpo", beta=beta, ref_logps=ref, use_bias_correction_kl=corr
        )
        assert out.loss.item() == pytest.approx(hand_aggregate(per_tok, mask.tolist(), "bnpo", 1), abs=1e-12)
        flat = [v for row, mr in zip(k3, mask.tolist(), strict=True) for v, m in zip(row, mr, strict=True) if m]
        assert out.metrics["kl"].item() == pytest.approx(sum(flat) / len(flat))
        out.loss.backward()
        grads.append(x.grad.clone())
    # value identical on-policy, gradient differs by β·k3·∂r/∂logp = β·k3 per token (÷ token count)
    torch.testing.assert_close(grads[0] - grads[1], beta * t(k3) * mask / mask.sum())


def test_delta_two_sided_clip() -> None:
    x = torch.tensor([[math.log(3.0)]], dtype=F64)
    out = clipped_policy_loss(x, torch.zeros(1, 1, dtype=F64), t([-1.0]), delta=2.0, aggregation="bnpo")
    assert out.loss.item() == pytest.approx(2.0)  # −min(2·(−1), 1.2·(−1)) = 2
    out = clipped_policy_loss(x, torch.zeros(1, 1, dtype=F64), t([-1.0]), aggregation="bnpo")
    assert out.loss.item() == pytest.approx(3.0)


def test_dapo_normalizer_and_grad_accumulation() -> None:
    logps, old, _, adv, mask = toy_batch(seed=5)
    base = clipped_policy_loss(logps, old, adv, mask, aggregation="dapo")
    ga = clipped_policy_loss(logps, old, adv, mask, aggregation="dapo", gradient_accumulation_steps=4)
    assert ga.loss.item() == pytest.approx(base.loss.item() / 4)
    custom = clipped_policy_loss(logps, old, adv, mask, aggregation="dapo", token_normalizer=100.0)
    assert custom.loss.item() == pytest.approx(base.loss.item() * mask.sum().item() / 100.0)
    for agg in ("grpo", "bnpo"):
        one = clipped_policy_loss(logps, old, adv, mask, aggregation=agg)
        two = clipped_policy_loss(logps, old, adv, mask, aggregation=agg, gradient_accumulation_steps=2)
        assert two.loss.item() == pytest.approx(one.loss.item() / 2)
        assert two.metrics["policy_loss"].item() == pytest.approx(one.loss.item())


def test_policy_loss_input_errors() -> None:
    logps, old, _, adv, mask = toy_batch()
    with pytest.raises(ValueError, match="aggregation"):
        clipped_policy_loss(logps, old, adv, mask, aggregation="cispo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_completion_length"):
        clipped_policy_loss(logps, old, adv, mask, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        clipped_policy_loss(logps, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        clipped_policy_loss(logps[0], old[0], adv, None)


# ------------------------------------------------------------------------------------------- diffusion: flow / guard


def test_flow_grpo_policy_loss_hand() -> None:
    logps, old, adv = t([-1.0, -2.0, -0.5, -0.1]), t([-1.1, -1.0, -0.5, -0.9]), t([2.0, -7.0, 0.5, 1.0])
    out = flow_grpo_policy_loss(logps, old, adv, clip_range=0.2, adv_clip_max=5.0)
    vals = []
    for lp, o, a in zip(logps.tolist(), old.tolist(), adv.tolist(), strict=True):
        a = max(min(a, 5.0), -5.0)
        r = math.exp(lp - o)
        vals.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
    assert out.loss.item() == pytest.approx(sum(vals) / 4)
    assert out.metrics["approx_kl"].item() == pytest.approx(
        0.5 * statistics.fmean((a - b) ** 2 for a, b in zip(logps.tolist(), old.tolist(), strict=True))
    )
    assert out.metrics["clipfrac"].item() == pytest.approx(0.5)  # log r = .1, −1, 0, .8


def _gauss_logp(x: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """flow_grpo's step log-prob: Gaussian log-density, mean over the latent elements."""
    lp = -((x - mu) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def test_grpo_guard_rationorm_identity_and_loss() -> None:
    g = torch.Generator().manual_seed(6)
    b, shape = 6, (3, 4, 4)
    sigma_t, sqrt_dt = 0.7, 0.3
    s = sigma_t * sqrt_dt
    mu_old = torch.randn(b, *shape, generator=g, dtype=F64)
    mu_new = mu_old + 0.05 * torch.randn(b, *shape, generator=g, dtype=F64)
    z = torch.randn(b, *shape, generator=g, dtype=F64)
    x_next = mu_old + s * z
    lp_old, lp_new = _gauss_logp(x_next, mu_old, s), _gauss_logp(x_next, mu_new, s)
    lr = grpo_guard_log_ratio(lp_new, lp_old, mu_new, mu_old, std_dev_t=t([sigma_t] * b), sqrt_dt=sqrt_dt)
    torch.testing.assert_close(lr, (z * (mu_new - mu_old)).flatten(1).mean(1))
    adv = torch.randn(b, generator=g, dtype=F64)
    eps = 2e-3
    out = grpo_guard_policy_loss(
        lp_new, lp_old, adv, mu_new, mu_old, std_dev_t=sigma_t, sqrt_dt=sqrt_dt, clip_range=eps
    )
    vals = []
    for i in range(b):
        r = math.exp(lr[i].item())
        a = adv[i].item()
        vals.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
    assert out.loss.item() == pytest.approx(statistics.fmean(vals) / sqrt_dt**2)
    # on-policy: RatioNorm ratio is exactly 1
    on = grpo_guard_log_ratio(lp_old, lp_old, mu_old, mu_old, std_dev_t=sigma_t, sqrt_dt=sqrt_dt)
    assert on.abs().max().item() == 0.0


def test_policy_loss_registry_maps_names_to_the_step_losses() -> None:
    g = torch.Generator().manual_seed(3)
    b = 5
    means, old_means = torch.randn(b, 2, 3, generator=g, dtype=F64), torch.randn(b, 2, 3, generator=g, dtype=F64)
    logps, old, adv = (torch.randn(b, generator=g, dtype=F64) for _ in range(3))
    step = PolicyStep(logps, old, 3 * adv, means, old_means, std_dev_t=0.6, sqrt_dt=0.4)
    assert list(POLICY_LOSSES) == ["flow_grpo", "grpo_guard"]
    assert [get_policy_loss(n).needs_means for n in POLICY_LOSSES] == [False, True]
    flow = get_policy_loss("flow_grpo")(step, clip_range=0.1, adv_clip_max=2.0)
    direct = flow_grpo_policy_loss(logps, old, 3 * adv, clip_range=0.1, adv_clip_max=2.0)
    assert flow.loss.item() == direct.loss.item() and flow.metrics.keys() == direct.metrics.keys()
    guard = get_policy_loss("grpo_guard")(step, clip_range=0.1, adv_clip_max=2.0)
    direct = grpo_guard_policy_loss(
        logps, old, 3 * adv, means, old_means, std_dev_t=0.6, sqrt_dt=0.4, clip_range=0.1, adv_clip_max=2.0
    )
    assert guard.loss.item() == direct.loss.item() != flow.loss.item()
    with pytest.raises(UnknownLossError, match="unknown policy loss 'flow_grp'.*Did you mean 'flow_grpo'"):
        get_policy_loss("flow_grp")
    with pytest.raises(ValueError, match="registered twice"):
        register_policy_loss("flow_grpo")(lambda step, **kw: None)
    with pytest.raises(ValueError, match="needs old_means"):
        no_means = PolicyStep(logps, old, adv, means, None, 0.6, 0.4)
        get_policy_loss("grpo_guard")(no_means, clip_range=0.1, adv_clip_max=2.0)


def test_flow_grpo_kl() -> None:
    mu = torch.zeros(2, 1, 2, 2, dtype=F64)
    ref = torch.ones(2, 1, 2, 2, dtype=F64)
    ref[1] *= 2
    assert flow_grpo_kl(mu, ref, 0.5).item() == pytest.approx((1 / 0.5 + 4 / 0.5) / 2)


# ------------------------------------------------------------------------------------------------------ advantages


def test_group_advantages_trl_semantics() -> None:
    r = [1.0, 2.0, 4.0, 0.0, 0.0, 0.0, 3.0, 5.0, 5.0]
    g = 3
    groups = [r[i : i + g] for i in range(0, len(r), g)]
    out = group_advantages(t(r), g, scale_rewards="group")
    exp = [(x - statistics.fmean(gr)) / (statistics.stdev(gr) + 1e-4) for gr in groups for x in gr]
    assert out.tolist() == pytest.approx(exp)
    out = group_advantages(t(r), g, scale_rewards="batch")
    sd = statistics.stdev(r)
    assert out.tolist() == pytest.approx([(x - statistics.fmean(gr)) / (sd + 1e-4) for gr in groups for x in gr])
    out = group_advantages(t(r), g, scale_rewards="none")
    assert out.tolist() == pytest.approx([x - statistics.fmean(gr) for gr in groups for x in gr])
    out = group_advantages(t(r), g, unbiased=False)  # flow_grpo np.std (ddof=0)
    assert out.tolist() == pytest.approx(
        [(x - statistics.fmean(gr)) / (statistics.pstdev(gr) + 1e-4) for gr in groups for x in gr]
    )


def test_group_advantages_nan_rewards() -> None:
    out = group_advantages(t([1.0, float("nan"), 3.0, 2.0]), 4)
    vals = [1.0, 3.0, 2.0]
    m, s = statistics.fmean(vals), statistics.stdev(vals)
    assert out.tolist() == pytest.approx([(1 - m) / (s + 1e-4), 0.0, (3 - m) / (s + 1e-4), (2 - m) / (s + 1e-4)])


def test_rloo() -> None:
    r = [1.0, 2.0, 6.0, -1.0, 0.5, 0.5]
    out = rloo_advantages(t(r), 3)
    exp = []
    for gi in range(2):
        gr = r[3 * gi : 3 * gi + 3]
        exp += [gr[i] - (sum(gr) - gr[i]) / 2 for i in range(3)]
    assert out.tolist() == pytest.approx(exp)
    assert out.view(2, 3).sum(1).abs().max().item() < 1e-12


def test_mc_grpo_hand_loop() -> None:
    r = [0.3, 0.9, 0.1, 0.5, 0.7, 1.0, 1.0, 0.0, 1.0, 1.0]  # G+1 = 5, second group has ties
    gp1 = 5
    adv, keep = mc_grpo_advantages(t(r), gp1)
    for gi in range(2):
        gr = r[gp1 * gi : gp1 * (gi + 1)]
        med = sorted(gr)[(gp1 - 1) // 2]
        mad = sorted(abs(x - med) for x in gr)[(gp1 - 1) // 2] + 1e-3
        a = [(x - med) / mad for x in gr]
        nz = sum(abs(v) > 1e-6 for v in a)
        a = [v * gp1 / nz if abs(v) > 1e-6 else v for v in a]
        assert adv[gp1 * gi : gp1 * (gi + 1)].tolist() == pytest.approx(a)
        k = keep[gp1 * gi : gp1 * (gi + 1)]
        assert int(k.sum()) == gp1 - 1
        dropped = int((~k).nonzero()[0, 0])
        assert gr[dropped] == med and adv[gp1 * gi + dropped].item() == 0.0
    assert keep[:5].tolist() == [True, True, True, False, True]  # pivot of the first group is 0.5


def _beta_pdf(p: float, a: float, b: float) -> float:
    if p in (0.0, 1.0):
        base = (p if a != 1 else 1.0) ** (a - 1) * ((1 - p) if b != 1 else 1.0) ** (b - 1)
    else:
        base = p ** (a - 1) * (1 - p) ** (b - 1)
    return base * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


def test_bnpo_against_hand_beta_moments() -> None:
    r = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]  # 4 prompts × 4
    g = 4
    out = bnpo_advantages(t(r), g)
    groups = [r[i : i + g] for i in range(0, len(r), g)]
    ps = [statistics.fmean(gr) for gr in groups]
    mu, v = statistics.fmean(ps), statistics.variance(ps)
    k = mu * (1 - mu) / v - 1
    alpha, beta = max(1 + k * mu / 3, 1.0), max(1 + k * (1 - mu) / 3, 1.0)
    a_t, b_t = bnpo_beta_params(t(ps))
    assert (a_t.item(), b_t.item()) == pytest.approx((alpha, beta))
    exp = []
    for gr, p in zip(groups, ps, strict=True):
        pdf = _beta_pdf(p, alpha, beta)
        w = min(1 / pdf, 1e6) if pdf > 0 else 1e6
        exp += [w * (x - p) for x in gr]
    assert out.tolist() == pytest.approx(exp)
    # cross-check the density against torch.distributions.Beta at an interior point
    d = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(beta))
    assert d.log_prob(torch.tensor(0.25)).exp().item() == pytest.approx(_beta_pdf(0.25, alpha, beta), rel=1e-5)


def test_bnpo_reinforce_special_case_and_decomposition() -> None:
    # p = (0, 1): μ = .5, v = .5 → a, b < 0 → α = β = 1 → uniform density → A = s − p
    r = t([0.0, 0.0, 1.0, 1.0])
    assert bnpo_advantages(r, 2).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    r = t([0.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # p = (.5, 1, 0)
    a, b = bnpo_beta_params(t([0.5, 1.0, 0.0]))
    assert (a.item(), b.item()) == (1.0, 1.0)
    assert bnpo_advantages(r, 2).tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    # affine map into [0, 1]
    assert bnpo_advantages(2 * r + 1, 2, reward_min=1.0, reward_max=3.0).tolist() == pytest.approx(
        bnpo_advantages(r, 2).tolist()
    )
    comp = torch.stack([r, 1 - r], dim=1)
    exp = (bnpo_advantages(r, 2) + bnpo_advantages(1 - r, 2)) / 2
    torch.testing.assert_close(bnpo_advantages(comp, 2), exp)
    with pytest.raises(ValueError, match="outside"):
        bnpo_advantages(t([2.0, 0.0]), 2)


def test_rank_helpers() -> None:
    r = t([0.2, 0.9, 0.1, 5.0, 4.0, 6.0])
    assert group_ranks(r, 3).tolist() == [1, 2, 0, 1, 0, 2]
    assert best_of_k_mask(r, 3).tolist() == [False, True, False, False, False, True]
    assert best_worst_advantages(r, 3).tolist() == [0.0, 1.0, -1.0, 0.0, -1.0, 1.0]


# -------------------------------------------------------------------------------------------------- reward shaping


def test_ensembles() -> None:
    m = t([[1.0, 2.0, 6.0], [0.0, -1.0, 1.0]])
    assert ensemble_reward(m).tolist() == pytest.approx([3.0, 0.0])
    assert ensemble_reward(m, method="min").tolist() == [1.0, -1.0]
    assert ensemble_reward(m, method="median").tolist() == [2.0, 0.0]
    lam = 0.5
    exp_uwo = [statistics.fmean(r) - lam * statistics.pvariance(r) for r in m.tolist()]
    assert ensemble_reward(m, method="uwo", uncertainty_coef=lam).tolist() == pytest.approx(exp_uwo)
    exp_std = [statistics.fmean(r) - lam * statistics.pstdev(r) for r in m.tolist()]
    assert ensemble_reward(m, method="mean_minus_std", uncertainty_coef=lam).tolist() == pytest.approx(exp_std)


def test_lsc_and_par() -> None:
    r, ref = t([0.0, 2.0, -1.0]), t([1.0, 1.0, 1.0])
    assert lsc_transform(r, ref).tolist() == pytest.approx(
        [math.log(sig(x - y)) for x, y in zip([0, 2, -1], [1, 1, 1], strict=True)]
    )
    rk, refk = t([[0.0, 1.0], [2.0, -1.0]]), t([[0.5, 0.5], [0.0, 0.0]])
    exp = [math.log(sig(-0.5)) + math.log(sig(0.5)), math.log(sig(2.0)) + math.log(sig(-1.0))]
    assert lsc_transform(rk, refk).tolist() == pytest.approx(exp)
    refs = t([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    assert lsc_reference(refs, quantile=0.5).tolist() == pytest.approx([2.0, 4.0 / 3])
    z85 = statistics.NormalDist().inv_cdf(0.85)
    assert lsc_reference(refs).tolist() == pytest.approx(
        [statistics.fmean(x) + z85 * statistics.pstdev(x) for x in refs.tolist()]
    )
    out = par_reward(t([1.0, 0.0]), refs, k=2.0)
    exp = [statistics.fmean(sig(2 * (x - y)) for y in row) for x, row in zip([1.0, 0.0], refs.tolist(), strict=True)]
    assert out.tolist() == pytest.approx(exp)
    assert ((out > 0) & (out < 1)).all()


def test_ches_toy_vectors() -> None:
    hp = t([[[1.0, 0.0], [1.0, 1.0], [9.0, 9.0]]])  # last position masked out
    hn = t([[[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]]])
    mp, mn = t([[1.0, 1.0, 0.0]]), t([[1.0, 1.0, 1.0]])
    # H+ = (2, 1), H− = (1, 2): ⟨H+,H−⟩ = 4, ‖H+‖² = 5
    assert ches_score(hp, hn, mp, mn).tolist() == pytest.approx([4.0 - 5.0])
    assert ches_score(hp, hn, mp, mn, length_normalized=True).tolist() == pytest.approx([4.0 / (2 * 3) - 5.0 / 4])
    # identical responses → CHES = 0 (maximally similar); orthogonal → −‖H+‖²
    assert ches_score(hp[:, :2], hp[:, :2]).item() == pytest.approx(0.0)
    assert ches_score(t([[[1.0, 0.0]]]), t([[[0.0, 3.0]]])).item() == pytest.approx(-1.0)


# --------------------------------------------------------------------------------------------- TRL 1.16 parity tier


def _trl_compute_loss(logps, old, ref, adv, mask, *, loss_type, is_level, beta, eps_lo, eps_hi, max_len, ga, corr):
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"parity pinned to trl 1.16.0, found {trl.__version__}")
    from trl import GRPOTrainer

    b, tt = logps.shape
    stub = SimpleNamespace(
        accelerator=SimpleNamespace(
            device=torch.device("cpu"),
            num_processes=1,
            sync_gradients=True,
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
            reduce=lambda x, reduction="sum": x,
        ),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        model=SimpleNamespace(training=True),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=is_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_lo,
        epsilon_high=eps_hi,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=ga,
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        args=SimpleNamespace(
            use_bias_correction_kl=corr,
            delta=None,
            steps_per_generation=ga,
            sapo_temperature_pos=1.0,
            sapo_temperature_neg=1.05,
        ),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    inputs = {
        "prompt_ids": torch.ones(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.ones(b, tt, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum() * ga,  # the generation batch = GA identical micro-batches
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", AGGS)
@pytest.mark.parametrize("is_level", ["token", "sequence"])
@pytest.mark.parametrize(("beta", "corr"), [(0.0, True), (0.05, True), (0.05, False)])
def test_trl_grpo_compute_loss_parity(loss_type: str, is_level: str, beta: float, corr: bool) -> None:
    logps, old, ref, adv, mask = toy_batch(seed=7, b=5, tt=6, spread=0.4)
    eps_lo, eps_hi, max_len, ga = 0.2, 0.28, 9, 2
    x_trl = logps.clone().requires_grad_(True)
    loss_trl, m_trl = _trl_compute_loss(
        x_trl,
        old,
        ref,
        adv,
        mask,
        loss_type=loss_type,
        is_level=is_level,
        beta=beta,
        eps_lo=eps_lo,
        eps_hi=eps_hi,
        max_len=max_len,
        ga=ga,
        corr=corr,
    )
    x = logps.clone().requires_grad_(True)
    out = clipped_policy_loss(
        x,
        old,
        adv,
        mask,
        epsilon_low=eps_lo,
        epsilon_high=eps_hi,
        aggregation=loss_type,  # type: ignore[arg-type]
        importance_sampling_level=is_level,
        max_completion_length=max_len,
        beta=beta,
        ref_logps=ref,  # type: ignore[arg-type]
        use_bias_correction_kl=corr,
        gradient_accumulation_steps=ga,
    )
    assert out.loss.item() == pytest.approx(loss_trl.item(), abs=1e-10)
    loss_trl.backward()
    out.loss.backward()
    torch.testing.assert_close(x.grad, x_trl.grad, atol=1e-10, rtol=1e-8)
    for key, val in m_trl.items():
        if key == "entropy":
            continue
        assert key in out.metrics, key
        # TRL divides its token counts in float32
        assert out.metrics[key].item() == pytest.approx(val, rel=1e-6, abs=1e-7, nan_ok=True), key
