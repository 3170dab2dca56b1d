"""DiffusionNFT loss core (arXiv 2509.16117): hand-computed values, gradients (gradcheck and the stop-gradient
weighting), parity with an independent re-implementation of the official training loop's formula
(``NVlabs/DiffusionNFT`` ``scripts/train_nft_sd3.py``) and stat tracker (``flow_grpo/stat_tracking.py``), the r / β
limits, and the old-policy decay schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffalign.losses.nft import nft_advantages, nft_loss, old_policy_decay, optimality_probability

F64 = torch.float64


def _small() -> dict[str, torch.Tensor]:
    """Two samples of shape (1, 1, 2), values picked so every term is easy to compute by hand."""
    return {
        "velocity": torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]], dtype=F64),
        "old_velocity": torch.tensor([[[[0.0, 1.0]]], [[[1.0, 1.0]]]], dtype=F64),
        "target": torch.tensor([[[[1.0, 1.0]]], [[[-1.0, 0.0]]]], dtype=F64),
        "r": torch.tensor([0.75, 0.25], dtype=F64),
        "sigma": torch.tensor([0.5, 1.0], dtype=F64),
    }


def _random(seed: int, b: int = 3, shape: tuple[int, ...] = (2, 3, 3)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g, dtype=F64)
    noise = torch.randn(b, *shape, generator=g, dtype=F64)
    t = torch.rand(b, generator=g, dtype=F64) * 0.9 + 0.05
    return {
        "x0": x0,
        "noise": noise,
        "t": t,
        "velocity": torch.randn(b, *shape, generator=g, dtype=F64),
        "old_velocity": torch.randn(b, *shape, generator=g, dtype=F64),
        "ref_velocity": torch.randn(b, *shape, generator=g, dtype=F64),
        "r": torch.rand(b, generator=g, dtype=F64),
    }


# --- hand-computed values -------------------------------------------------------------------------------------------


def test_hand_values_without_weighting() -> None:
    # beta = 0.5. Sample 0: v+ = [0.5, 1.5], v- = [-0.5, 0.5], target [1, 1] -> l+ = 0.25, l- = 1.25;
    # 5 * (0.75 * 0.25 + 0.25 * 1.25) / 0.5 = 5.0. Sample 1: v+ = [0.5, 0], v- = [1.5, 2], target [-1, 0]
    # -> l+ = 1.125, l- = 5.125; 5 * (0.25 * 1.125 + 0.75 * 5.125) / 0.5 = 41.25.
    out = nft_loss(**_small(), beta=0.5, adaptive_weighting=False, kl_coef=0.0)
    torch.testing.assert_close(out.per_token_loss, torch.tensor([5.0, 41.25], dtype=F64))
    assert out.loss.item() == pytest.approx((5.0 + 41.25) / 2)
    assert out.metrics["positive_loss"].item() == pytest.approx((0.25 + 1.125) / 2)
    assert out.metrics["negative_loss"].item() == pytest.approx((1.25 + 5.125) / 2)
    # (v_theta - v_old)^2 = [1, 1] and [1, 4]
    assert out.metrics["old_deviate"].item() == pytest.approx(7 / 4)
    assert out.metrics["old_deviate_max"].item() == pytest.approx(4.0)


def test_hand_values_with_adaptive_weighting_and_kl() -> None:
    # Sample 0 (sigma 0.5): x0 errors + = [0.25, -0.25] -> 0.0625 / 0.25 = 0.25; - = [0.75, 0.25] -> 0.3125 / 0.5.
    # Sample 1 (sigma 1): + = [-1.5, 0] -> 1.125 / 0.75 = 1.5; - = [-2.5, -2] -> 5.125 / 2.25.
    # KL to v_ref = 0: mean(v_theta^2) = 2.5 and 0.5, times 0.1.
    inputs = _small()
    ref = torch.zeros_like(inputs["velocity"])
    out = nft_loss(**inputs, beta=0.5, ref_velocity=ref, kl_coef=0.1)
    policy = [10 * (0.75 * 0.25 + 0.25 * 0.3125 / 0.5), 10 * (0.25 * 1.5 + 0.75 * 5.125 / 2.25)]
    expected = torch.tensor([policy[0] + 0.25, policy[1] + 0.05], dtype=F64)
    torch.testing.assert_close(out.per_token_loss, expected)
    assert out.metrics["policy_loss"].item() == pytest.approx(sum(policy) / 2)
    assert out.metrics["unweighted_policy_loss"].item() == pytest.approx(sum(policy) / 2 / 5)
    assert out.metrics["kl_div"].item() == pytest.approx(1.5)
    assert out.metrics["old_kl_div"].item() == pytest.approx((0.5 + 1.0) / 2)  # mean(v_old^2) = 0.5 and 1


def test_rewards_to_r_by_hand() -> None:
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    groups = torch.tensor([0, 0, 1, 1])
    # group means 2 and 4; population std of all four rewards = sqrt(14 / 4)
    std = math.sqrt(3.5) + 1e-4
    adv = torch.tensor([-1.0, 1.0, -2.0, 2.0]) / std
    torch.testing.assert_close(nft_advantages(rewards, groups), adv)
    torch.testing.assert_close(optimality_probability(rewards, groups), adv / 10 + 0.5)
    # c = 1 clips the +-1.07 advantages to +-1 -> r = 0 / 1
    clipped = optimality_probability(rewards, groups, adv_clip_max=1.0)
    torch.testing.assert_close(clipped, torch.tensor([0.5 - 0.5 / std, 0.5 + 0.5 / std, 0.0, 1.0]))
    # per-group std: 1 and 2
    local = nft_advantages(rewards, groups, global_std=False)
    torch.testing.assert_close(local, torch.tensor([-1 / 1.0001, 1 / 1.0001, -2 / 2.0001, 2 / 2.0001]))
    torch.testing.assert_close(
        optimality_probability(rewards, groups, adv_mode="one_only"), torch.tensor([0.5, 0.6, 0.5, 0.6])
    )
    torch.testing.assert_close(
        optimality_probability(rewards, groups, adv_mode="binary"), torch.tensor([0.4, 0.6, 0.4, 0.6])
    )
    pos = optimality_probability(rewards, groups, adv_mode="positive_only")
    torch.testing.assert_close(pos, torch.tensor([0.5, 0.5 + 0.1 / std, 0.5, 0.5 + 0.2 / std]))


def test_old_policy_decay_schedules() -> None:
    assert [old_policy_decay(s) for s in (0, 1, 250, 500, 10_000)] == pytest.approx([0.0, 0.001, 0.25, 0.5, 0.5])
    assert [old_policy_decay(s, 2) for s in (0, 74, 75, 76, 175, 300)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.0075, 0.75, 0.999]
    )
    assert old_policy_decay(1000, 0) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        old_policy_decay(3, 7)


# --- gradients ------------------------------------------------------------------------------------------------------


def test_gradcheck_float64_without_weighting() -> None:
    data = _random(0)
    target = data["noise"] - data["x0"]
    v = data["velocity"].clone().requires_grad_(True)

    def fn(velocity: torch.Tensor) -> torch.Tensor:
        return nft_loss(
            velocity,
            data["old_velocity"],
            target,
            data["r"],
            data["t"],
            beta=0.3,
            adaptive_weighting=False,
            ref_velocity=data["ref_velocity"],
            kl_coef=0.01,
        ).loss

    assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-8)


def test_adaptive_weights_stop_the_gradient() -> None:
    # The weight is detached, so d loss / d v_theta = (s / beta / B) * [r * 2 sigma^2 beta (v+ - v) / (N w+)
    # - (1 - r) * 2 sigma^2 beta (v- - v) / (N w-)] + lambda * 2 (v_theta - v_ref) / (N B).
    data = _random(1)
    target = data["noise"] - data["x0"]
    beta, scale, lam = 0.4, 5.0, 0.01
    v = data["velocity"].clone().requires_grad_(True)
    out = nft_loss(
        v, data["old_velocity"], target, data["r"], data["t"], beta=beta, ref_velocity=data["ref_velocity"], kl_coef=lam
    )
    out.loss.backward()
    b, n = v.shape[0], v[0].numel()
    col = (1, 1, 1, 1)
    sig, r = data["t"].view(-1, *col[1:]), data["r"].view(-1, *col[1:])
    vp = beta * data["velocity"] + (1 - beta) * data["old_velocity"]
    vn = (1 + beta) * data["old_velocity"] - beta * data["velocity"]
    wp = (sig * (vp - target)).abs().mean(dim=(1, 2, 3), keepdim=True)
    wn = (sig * (vn - target)).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (scale / beta / b) * (
        r * 2 * sig**2 * beta * (vp - target) / (n * wp) - (1 - r) * 2 * sig**2 * beta * (vn - target) / (n * wn)
    ) + lam * 2 * (data["velocity"] - data["ref_velocity"]) / (n * b)
    torch.testing.assert_close(v.grad, grad, rtol=1e-10, atol=1e-12)


# --- parity with the official formula -------------------------------------------------------------------------------


def _official_loss(data: dict[str, torch.Tensor], beta: float, adv_clip_max: float, kl_beta: float) -> torch.Tensor:
    """The training loop of ``train_nft_sd3.py`` written out again in x0 space (float64 tensors)."""
    x0, t = data["x0"], data["t"]
    t_col = t.view(-1, 1, 1, 1)
    xt = (1 - t_col) * x0 + t_col * data["noise"]
    fwd, old, ref, r = data["velocity"], data["old_velocity"], data["ref_velocity"], data["r"]
    dims = (1, 2, 3)
    pos_pred = beta * fwd + (1 - beta) * old
    neg_pred = (1.0 + beta) * old - beta * fwd
    x0_pos = xt - t_col * pos_pred
    w_pos = torch.abs(x0_pos - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)
    pos_loss = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    x0_neg = xt - t_col * neg_pred
    w_neg = torch.abs(x0_neg - x0).mean(dim=dims, keepdim=True).clip(min=0.00001)
    neg_loss = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    policy = ((r * pos_loss / beta + (1.0 - r) * neg_loss / beta) * adv_clip_max).mean()
    kl = ((fwd - ref) ** 2).mean(dim=dims)
    return policy + kl_beta * kl.mean()


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_parity_with_official_loss(beta: float) -> None:
    for seed in range(3):
        data = _random(10 + seed, b=4)
        out = nft_loss(
            data["velocity"],
            data["old_velocity"],
            data["noise"] - data["x0"],
            data["r"],
            data["t"],
            beta=beta,
            ref_velocity=data["ref_velocity"],
        )
        expected = _official_loss(data, beta=beta, adv_clip_max=5.0, kl_beta=1e-4)
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0.0)


def _official_r(prompts: list[str], rewards: np.ndarray, global_std: bool, adv_clip_max: float) -> np.ndarray:
    """``PerPromptStatTracker.update`` followed by the loop's clip and [0, 1] map, in numpy."""
    prompts_arr = np.array(prompts)
    adv = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts_arr):
        group = rewards[prompts_arr == prompt]
        mean = np.mean(group, axis=0, keepdims=True)
        std = (np.std(rewards, axis=0, keepdims=True) if global_std else np.std(group, axis=0, keepdims=True)) + 1e-4
        adv[prompts_arr == prompt] = (group - mean) / std
    adv = np.clip(adv, -adv_clip_max, adv_clip_max)
    return np.clip(adv / adv_clip_max / 2.0 + 0.5, 0, 1)


@pytest.mark.parametrize("global_std", [True, False])
def test_parity_with_official_reward_normalisation(global_std: bool) -> None:
    rng = np.random.default_rng(3)
    prompts = [f"prompt {i}" for i in rng.integers(0, 4, size=24)]  # interleaved, unequal groups
    rewards = rng.normal(size=24) * 2.0
    rewards[:3] *= 20  # pushes some advantages past the clip
    _, ids = np.unique(np.array(prompts), return_inverse=True)
    for clip in (5.0, 1.0):
        got = optimality_probability(
            torch.from_numpy(rewards), torch.from_numpy(ids), adv_clip_max=clip, global_std=global_std
        )
        np.testing.assert_allclose(got.numpy(), _official_r(prompts, rewards, global_std, clip), rtol=1e-12, atol=0)


# --- limits ---------------------------------------------------------------------------------------------------------


def _branch(u: torch.Tensor, target: torch.Tensor, t: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """One implicit policy's per-sample error, written from the formula."""
    if not adaptive:
        return ((u - target) ** 2).mean(dim=(1, 2, 3))
    err = t.view(-1, 1, 1, 1) * (u - target)
    return (err**2).mean(dim=(1, 2, 3)) / err.abs().mean(dim=(1, 2, 3))


def test_r_one_keeps_only_the_positive_term_and_r_zero_only_the_negative() -> None:
    data = _random(4)
    target, v, old, t = data["noise"] - data["x0"], data["velocity"], data["old_velocity"], data["t"]
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    beta = 0.5
    v_pos, v_neg = beta * v + (1 - beta) * old, (1 + beta) * old - beta * v
    for adaptive in (True, False):
        pos = nft_loss(v, old, target, ones, t, beta=beta, adaptive_weighting=adaptive, kl_coef=0.0)
        neg = nft_loss(v, old, target, zeros, t, beta=beta, adaptive_weighting=adaptive, kl_coef=0.0)
        torch.testing.assert_close(pos.per_token_loss, 5.0 * _branch(v_pos, target, t, adaptive) / beta)
        torch.testing.assert_close(neg.per_token_loss, 5.0 * _branch(v_neg, target, t, adaptive) / beta)
    # beta = 1, r = 1, no weighting: plain flow matching on v_theta
    fm = nft_loss(v, old, target, ones, t, beta=1.0, adaptive_weighting=False, kl_coef=0.0)
    torch.testing.assert_close(fm.per_token_loss, 5.0 * ((v - target) ** 2).mean(dim=(1, 2, 3)))
    # beta = 1, r = 0: the negative policy is 2 v_old - v_theta
    neg1 = nft_loss(v, old, target, zeros, t, beta=1.0, adaptive_weighting=False, kl_coef=0.0)
    torch.testing.assert_close(neg1.per_token_loss, 5.0 * ((2 * old - v - target) ** 2).mean(dim=(1, 2, 3)))


def test_minimiser_moves_by_two_r_minus_one_over_beta() -> None:
    # Without the weighting one sample's loss is minimised at v_old + (2r - 1) / beta * (v - v_old).
    data = _random(5)
    target = data["noise"] - data["x0"]
    old = data["old_velocity"]
    for beta in (1.0, 0.5, 0.05):
        r = data["r"].view(-1, 1, 1, 1)
        best = (old + (2 * r - 1) / beta * (target - old)).requires_grad_(True)
        nft_loss(
            best, old, target, data["r"], data["t"], beta=beta, adaptive_weighting=False, kl_coef=0.0
        ).loss.backward()
        torch.testing.assert_close(best.grad, torch.zeros_like(best), atol=1e-12, rtol=0)
        shifted = (best.detach() + 0.1).requires_grad_(True)
        nft_loss(
            shifted, old, target, data["r"], data["t"], beta=beta, adaptive_weighting=False, kl_coef=0.0
        ).loss.backward()
        # quadratic with curvature 2 s beta / (B N) per element: a shift of 0.1 gives exactly this gradient
        curvature = 2 * 5.0 * beta / (old.shape[0] * old[0].numel())
        torch.testing.assert_close(shifted.grad, torch.full_like(old, 0.1 * curvature), rtol=1e-9, atol=1e-12)


def test_gradient_at_the_old_policy_does_not_depend_on_beta() -> None:
    data = _random(6)
    target = data["noise"] - data["x0"]
    old = data["old_velocity"]
    b, n = old.shape[0], old[0].numel()
    expected = 2 * 5.0 * (2 * data["r"].view(-1, 1, 1, 1) - 1) * (old - target) / (b * n)
    for beta in (1.0, 0.1, 1e-4):
        v = old.clone().requires_grad_(True)
        nft_loss(v, old, target, data["r"], data["t"], beta=beta, adaptive_weighting=False, kl_coef=0.0).loss.backward()
        torch.testing.assert_close(v.grad, expected, rtol=1e-9, atol=1e-12)


def test_old_velocity_gets_no_gradient() -> None:
    data = _random(7)
    old = data["old_velocity"].clone().requires_grad_(True)
    v = data["velocity"].clone().requires_grad_(True)
    nft_loss(v, old, data["noise"] - data["x0"], data["r"], data["t"], kl_coef=0.0).loss.backward()
    assert old.grad is None and v.grad is not None


# --- input checks ---------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_errors() -> None:
    d = _small()
    with pytest.raises(ValueError, match="ref_velocity"):
        nft_loss(**d)  # default kl_coef 1e-4 needs the reference model's velocity
    with pytest.raises(ValueError, match="old_velocity"):
        nft_loss(d["velocity"], d["old_velocity"][:1], d["target"], d["r"], d["sigma"], kl_coef=0.0)
    with pytest.raises(ValueError, match="`r`"):
        nft_loss(d["velocity"], d["old_velocity"], d["target"], d["r"][:1], d["sigma"][:1], kl_coef=0.0)
    with pytest.raises(ValueError, match="beta"):
        nft_loss(**d, beta=0.0, kl_coef=0.0)
    with pytest.raises(ValueError, match="adv_mode"):
        optimality_probability(torch.ones(4), adv_mode="top")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group_ids"):
        nft_advantages(torch.ones(4), torch.zeros(4))
