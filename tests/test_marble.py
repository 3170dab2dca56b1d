"""MARBLE's tensor math (arXiv 2605.06507): the floored-simplex projection against brute force, the min-norm program
against its K = 2 closed form, its KKT conditions and a grid search, the balanced direction's min-norm property and
weights, NaN / zero-gradient handling, per-reward advantages against ``nft_advantages`` and by hand, and the amortised
blend's exactness in DiffusionNFT's loss (and where it stops being exact)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffalign.losses.marble import (
    blend_advantages,
    gradient_cosines,
    marble_weights,
    min_norm_coefficients,
    per_reward_advantages,
    project_to_simplex,
    smooth_coefficients,
)
from diffalign.losses.nft import nft_advantages, nft_loss, probability_from_advantage

F64 = torch.float64


def _gram(k: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` random unit vectors in ``R^p`` (rank-deficient when ``p < k``) and their Gram matrix."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, p, generator=g, dtype=F64)
    x = x / x.norm(dim=1, keepdim=True)
    return x, x @ x.T


def _check_kkt(gram: torch.Tensor, alpha: torch.Tensor, floor: float) -> None:
    """Stationarity of ½αᵀGα on {Σα = 1, α ≥ floor}: (Gα)_k = λ where α_k > floor, (Gα)_k ≥ λ where α_k = floor."""
    assert alpha.dtype == F64
    assert abs(float(alpha.sum()) - 1.0) < 1e-14
    assert bool((alpha >= floor - 1e-15).all())
    grad = gram @ alpha
    free = alpha > floor + 1e-9
    assert bool(free.any())
    lam = grad[free].mean()
    assert float((grad[free] - lam).abs().max()) < 1e-12
    if bool((~free).any()):
        assert float((grad[~free] - lam).min()) > -1e-12


# --- projection onto the (floored) simplex -------------------------------------------------------------------------


def test_projection_by_hand() -> None:
    torch.testing.assert_close(project_to_simplex(torch.tensor([2.0, 0.0, 0.0], dtype=F64)), torch.eye(3, dtype=F64)[0])
    # theta = 0.2: (0.8, 0.6, 0) - 0.2 -> (0.6, 0.4, 0)
    p = project_to_simplex(torch.tensor([0.8, 0.6, 0.0], dtype=F64))
    torch.testing.assert_close(p, torch.tensor([0.6, 0.4, 0.0], dtype=F64), rtol=0, atol=1e-15)
    # floor 0.1: (1, 0, 0) -> (0.8, 0.1, 0.1); floor = 1/K pins every coordinate
    p = project_to_simplex(torch.tensor([1.0, 0.0, 0.0], dtype=F64), floor=0.1)
    torch.testing.assert_close(p, torch.tensor([0.8, 0.1, 0.1], dtype=F64), rtol=0, atol=1e-15)
    p = project_to_simplex(torch.tensor([5.0, -1.0, 0.0, 2.0], dtype=F64), floor=0.25)
    torch.testing.assert_close(p, torch.full((4,), 0.25, dtype=F64), rtol=0, atol=0)
    # a point already on the simplex stays
    v = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    torch.testing.assert_close(project_to_simplex(v), v, rtol=0, atol=1e-15)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_projection_kkt_and_brute_force(floor: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for k in range(2, 7):
        # candidate points of the floored simplex, to check no feasible point is closer to v than the projection
        candidates = floor + (1 - k * floor) * torch.distributions.Dirichlet(torch.ones(k, dtype=F64)).sample((20000,))
        for _ in range(5):
            v = torch.randn(k, generator=gen, dtype=F64) * 2
            p = project_to_simplex(v, floor)
            assert abs(float(p.sum()) - 1.0) < 1e-14
            assert bool((p >= floor).all())
            free = p > floor
            shift = v - p  # = θ + floor on the free coordinates, ≤ that on the clamped ones
            assert float(shift[free].max() - shift[free].min()) < 1e-14
            if bool((~free).any()):
                assert float(shift[~free].max()) <= float(shift[free].min()) + 1e-14
            best = float(((candidates - v) ** 2).sum(dim=1).min())
            assert float(((p - v) ** 2).sum()) <= best + 1e-14


# --- the min-norm program ------------------------------------------------------------------------------------------


def test_two_rewards_closed_form() -> None:
    gen = torch.Generator().manual_seed(1)
    cases = [torch.randn(2, 5, generator=gen, dtype=F64) for _ in range(20)]
    # one gradient inside the other's half-line region: the optimum is a vertex (clip active)
    cases.append(torch.tensor([[1.0, 0.0], [3.0, 0.5]], dtype=F64))
    cases.append(torch.tensor([[3.0, 0.5], [1.0, 0.0]], dtype=F64))
    hit_clip = 0
    for x in cases:
        gram = x @ x.T
        a1 = (gram[1, 1] - gram[0, 1]) / (gram[0, 0] - 2 * gram[0, 1] + gram[1, 1])
        hit_clip += int(not 0 < float(a1) < 1)
        expected = torch.stack([a1.clamp(0, 1), 1 - a1.clamp(0, 1)])
        torch.testing.assert_close(min_norm_coefficients(gram), expected, rtol=0, atol=1e-13)
    assert hit_clip >= 2


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_kkt_on_random_grams(floor: float) -> None:
    seen_boundary = 0
    for k, p, seed in itertools.product(range(3, 6), (2, 3, 8), range(10)):
        _, gram = _gram(k, p, seed)
        alpha = min_norm_coefficients(gram, floor=floor)
        _check_kkt(gram, alpha, floor)
        seen_boundary += int(bool((alpha <= floor + 1e-9).any()))
    assert seen_boundary >= 10  # the inequality half of the KKT conditions was exercised


@pytest.mark.parametrize("floor", [0.0, 0.15])
def test_grid_search_three_rewards(floor: float) -> None:
    # Brute force on the points themselves (not the Gram matrix): ½||Σ α_k x_k||² over a grid of the floored simplex.
    steps = 300
    a, b = torch.meshgrid(torch.arange(steps + 1, dtype=F64), torch.arange(steps + 1, dtype=F64), indexing="ij")
    keep = a + b <= steps
    beta = torch.stack([a[keep], b[keep], steps - a[keep] - b[keep]], dim=1) / steps
    grid = floor + (1 - 3 * floor) * beta
    for seed in range(6):
        x, gram = _gram(3, 4, seed + 100)
        values = 0.5 * ((grid @ x) ** 2).sum(dim=1)
        alpha = min_norm_coefficients(gram, floor=floor)
        best = 0.5 * float(((alpha @ x) ** 2).sum())
        assert best <= float(values.min()) + 1e-15
        assert float(values.min()) - best < 1e-4  # the grid is within one cell of the optimum
        assert float((grid[values.argmin()] - alpha).abs().max()) < 0.03


def test_floor_keeps_every_reward() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)  # MGDA drops the third: α = (½, ½, 0)
    gram = x @ x.T
    torch.testing.assert_close(
        min_norm_coefficients(gram), torch.tensor([0.5, 0.5, 0.0], dtype=F64), rtol=0, atol=1e-14
    )
    alpha = min_norm_coefficients(gram, floor=0.2)
    # α = (a, a, 0.2) with 2a = 0.8 (symmetry)
    torch.testing.assert_close(alpha, torch.tensor([0.4, 0.4, 0.2], dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(min_norm_coefficients(gram, floor=1 / 3), torch.full((3,), 1 / 3, dtype=F64))


def test_degenerate_grams() -> None:
    torch.testing.assert_close(min_norm_coefficients(torch.zeros(4, 4, dtype=F64)), torch.full((4,), 0.25, dtype=F64))
    assert min_norm_coefficients(torch.tensor([[2.0]])).tolist() == [1.0]
    # 0 in the hull: three unit vectors at 120°, the minimum norm is 0 at α uniform
    x = torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]], dtype=F64)
    alpha = min_norm_coefficients(x @ x.T)
    torch.testing.assert_close(alpha, torch.full((3,), 1 / 3, dtype=F64), rtol=0, atol=1e-13)
    # float32 input: computed and returned in float64
    assert min_norm_coefficients((x @ x.T).float()).dtype == F64


# --- the balanced direction ----------------------------------------------------------------------------------------


def test_opposed_pair_mean_hurts_one_reward_marble_helps_both() -> None:
    grads = torch.tensor([[1.0, 0.0], [-3.0, 1.0]], dtype=F64)
    mean_cos = gradient_cosines(grads, grads.mean(dim=0))
    assert float(mean_cos[0]) < 0  # the plain mean makes reward 0 worse
    step = marble_weights(grads)
    assert bool((step.cosines > 0).all())
    unit = grads / grads.norm(dim=1, keepdim=True)
    # K = 2 closed form on the normalised gradients, then rescaled to the mean norm (1 + √10) / 2
    g = unit @ unit.T
    a1 = float((g[1, 1] - g[0, 1]) / (g[0, 0] - 2 * g[0, 1] + g[1, 1]))
    expected = (a1 * unit[0] + (1 - a1) * unit[1]) * (1 + math.sqrt(10)) / 2
    torch.testing.assert_close(step.direction, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("k", [3, 4, 5])
def test_min_norm_property_on_conflicting_gradients(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    conflicted = 0
    for _ in range(20):
        scales = torch.rand(k, 1, generator=gen, dtype=F64) * 10 + 0.1
        grads = torch.randn(k, 12, generator=gen, dtype=F64) * scales
        grads[1] = -0.7 * grads[0] + 0.3 * grads[1]  # a reward that largely opposes reward 0
        conflicted += int(float(gradient_cosines(grads, grads.sum(dim=0)).min()) < 0)
        step = marble_weights(grads)
        unit = grads / grads.norm(dim=1, keepdim=True)
        d_hat = step.alpha @ unit
        # ĝ_k · d̂ ≥ ||d̂||² > 0 for every reward, so every cosine with the update is positive
        assert float(d_hat.norm()) > 1e-3
        assert float((unit @ d_hat - d_hat @ d_hat).min()) > -1e-12
        assert bool((step.cosines > 0).all())
        torch.testing.assert_close(step.cosines, gradient_cosines(grads, step.direction), rtol=0, atol=1e-14)
    assert conflicted >= 5  # the weighted sum hurt some reward in those batches


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_weights_reproduce_the_direction(floor: float) -> None:
    gen = torch.Generator().manual_seed(7)
    grads = torch.randn(4, 30, generator=gen, dtype=F64) * torch.tensor([[0.01], [1.0], [5.0], [100.0]], dtype=F64)
    step = marble_weights(grads, floor=floor)
    norms = grads.norm(dim=1)
    torch.testing.assert_close(step.norms, norms, rtol=0, atol=0)
    torch.testing.assert_close(step.weights @ grads, step.direction, rtol=1e-13, atol=1e-13)
    expected = (step.alpha @ (grads / norms[:, None])) * norms.mean()
    torch.testing.assert_close(step.direction, expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(step.weights, step.alpha * norms.mean() / norms, rtol=1e-14, atol=0)
    # α only sees directions: rescaling one reward's gradient leaves it unchanged
    rescaled = marble_weights(grads * torch.tensor([[3.0], [1.0], [0.5], [1.0]], dtype=F64), floor=floor)
    torch.testing.assert_close(rescaled.alpha, step.alpha, rtol=0, atol=1e-13)
    assert step.alpha.dtype == F64 and step.weights.dtype == F64


def test_zero_and_non_finite_gradients_are_left_out() -> None:
    gen = torch.Generator().manual_seed(3)
    good = torch.randn(3, 6, generator=gen, dtype=F64)
    grads = torch.cat([good[:1], torch.zeros(1, 6, dtype=F64), good[1:2], torch.full((1, 6), math.nan, dtype=F64)])
    grads = torch.cat([grads, good[2:], torch.tensor([[math.inf, 0, 0, 0, 0, 0]], dtype=F64)])
    step = marble_weights(grads)
    ref = marble_weights(good)
    kept = torch.tensor([0, 2, 4])
    dropped = torch.tensor([1, 3, 5])
    torch.testing.assert_close(step.alpha[kept], ref.alpha, rtol=0, atol=0)
    torch.testing.assert_close(step.weights[kept], ref.weights, rtol=0, atol=0)
    torch.testing.assert_close(step.direction, ref.direction, rtol=0, atol=0)
    assert step.alpha[dropped].tolist() == [0.0, 0.0, 0.0]
    assert step.weights[dropped].tolist() == [0.0, 0.0, 0.0]
    assert step.cosines[dropped].tolist() == [0.0, 0.0, 0.0]
    # nothing valid: uniform α, no update
    none = marble_weights(torch.stack([torch.zeros(6, dtype=F64), torch.full((6,), math.nan, dtype=F64)]))
    assert none.alpha.tolist() == [0.5, 0.5]
    assert none.weights.tolist() == [0.0, 0.0]
    assert none.direction.abs().sum().item() == 0.0


def test_gradient_cosines_by_hand() -> None:
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-2.0, -2.0]], dtype=F64)
    cos = gradient_cosines(grads, torch.tensor([1.0, 1.0], dtype=F64))
    torch.testing.assert_close(cos, torch.tensor([1 / math.sqrt(2), 0.0, 1.0, -1.0], dtype=F64))
    assert gradient_cosines(grads, torch.zeros(2, dtype=F64)).tolist() == [0.0] * 4


# --- EMA and the amortised blend -----------------------------------------------------------------------------------


def test_smooth_coefficients() -> None:
    prev = torch.tensor([0.2, 0.8], dtype=F64)
    new = torch.tensor([0.6, 0.4], dtype=F64)
    torch.testing.assert_close(smooth_coefficients(prev, new), torch.tensor([0.32, 0.68], dtype=F64))
    torch.testing.assert_close(smooth_coefficients(prev, new, rho=0.0), new)
    torch.testing.assert_close(smooth_coefficients(None, new), new)
    # 10 updates toward a fixed point close the gap by 0.7^10
    alpha = prev
    for _ in range(10):
        alpha = smooth_coefficients(alpha, new)
    torch.testing.assert_close(alpha, new + (prev - new) * 0.7**10)


def test_blend_advantages_by_hand() -> None:
    adv = torch.tensor([[1.0, -2.0], [0.0, 4.0]], dtype=F64)
    out = blend_advantages(adv, torch.tensor([0.25, 0.75], dtype=F64))
    torch.testing.assert_close(out, torch.tensor([0.25 - 1.5, 3.0], dtype=F64))


@pytest.mark.parametrize("adaptive", [False, True])
def test_blend_is_exact_in_the_nft_loss(adaptive: bool) -> None:
    # The loss is affine in r = A/(2c) + 1/2 and Σα = 1, so L(r(Σ α_k A_k)) = Σ α_k L(r(A_k)), gradients included.
    # With the adaptive weighting (which does not depend on r) it holds as well.
    gen = torch.Generator().manual_seed(11)
    b, c = 4, 5.0
    shape = (b, 2, 3, 3)
    velocity = torch.randn(shape, generator=gen, dtype=F64)
    old = torch.randn(shape, generator=gen, dtype=F64)
    target = torch.randn(shape, generator=gen, dtype=F64)
    sigma = torch.rand(b, generator=gen, dtype=F64)
    adv = torch.randn(b, 3, generator=gen, dtype=F64) * 1.5  # |A| < c: no clip
    assert float(adv.abs().max()) < c
    alpha = torch.tensor([0.5, 0.2, 0.3], dtype=F64)

    def loss_and_grad(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = velocity.clone().requires_grad_(True)
        out = nft_loss(v, old, target, r, sigma, beta=0.3, adaptive_weighting=adaptive, kl_coef=0.0)
        out.loss.backward()
        return out.loss.detach(), v.grad

    blended = blend_advantages(adv, alpha)
    r_blend = blended / (2 * c) + 0.5
    torch.testing.assert_close(probability_from_advantage(blended, adv_clip_max=c), r_blend, rtol=0, atol=1e-15)
    loss, grad = loss_and_grad(r_blend)
    parts = [loss_and_grad(adv[:, k] / (2 * c) + 0.5) for k in range(3)]
    torch.testing.assert_close(loss, sum(a * p[0] for a, p in zip(alpha, parts, strict=True)), rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, sum(a * p[1] for a, p in zip(alpha, parts, strict=True)), rtol=1e-13, atol=1e-15)

    # once the clip bites (c = 1 here), the blend of the clipped r's is no longer the r of the blend
    clipped = [probability_from_advantage(adv[:, k], adv_clip_max=1.0) for k in range(3)]
    r_of_blend = probability_from_advantage(blended, adv_clip_max=1.0)
    assert float((r_of_blend - sum(a * r for a, r in zip(alpha, clipped, strict=True))).abs().max()) > 1e-3


# --- per-reward advantages -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_std", [True, False])
def test_per_reward_advantages_are_nft_advantages_per_column(global_std: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    rewards = torch.randn(12, 3, generator=gen, dtype=F64) * torch.tensor([1.0, 10.0, 0.01], dtype=F64)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    for ids in (groups, None):
        out = per_reward_advantages(rewards, ids, global_std=global_std)
        for k in range(3):
            torch.testing.assert_close(out[:, k], nft_advantages(rewards[:, k], ids, global_std=global_std))


def test_per_reward_advantages_mask_nan_by_hand() -> None:
    nan = math.nan
    rewards = torch.tensor([[1.0, nan, nan], [3.0, 4.0, nan], [2.0, 0.0, nan], [6.0, 2.0, nan]], dtype=F64)
    groups = torch.tensor([0, 0, 1, 1])
    out = per_reward_advantages(rewards, groups)
    # column 0 has no NaN: the ordinary advantages (group means 2 and 4, population std sqrt(3.5))
    torch.testing.assert_close(out[:, 0], torch.tensor([-1.0, 1.0, -2.0, 2.0], dtype=F64) / (math.sqrt(3.5) + 1e-4))
    # column 1 over its three values {4 | 0, 2}: group means 4 and 1, population std of (4, 0, 2) = sqrt(8/3)
    std = math.sqrt(8 / 3) + 1e-4
    torch.testing.assert_close(out[:, 1], torch.tensor([0.0, 0.0, -1 / std, 1 / std], dtype=F64))
    assert out[:, 2].tolist() == [0.0] * 4  # a reward that applies to no sample
    # per-group std: group 0 has one value (std 0, advantage 0), group 1 has std 1
    local = per_reward_advantages(rewards, groups, global_std=False)
    torch.testing.assert_close(local[:, 1], torch.tensor([0.0, 0.0, -1 / 1.0001, 1 / 1.0001], dtype=F64))
    assert not bool(torch.isnan(out).any())


# --- errors --------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_line_errors() -> None:
    gram = torch.eye(3, dtype=F64)
    cases = [
        (lambda: per_reward_advantages(torch.zeros(4)), "rewards"),
        (lambda: per_reward_advantages(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)), "group_ids"),
        (lambda: per_reward_advantages(torch.tensor([[math.inf], [0.0]])), "inf"),
        (lambda: min_norm_coefficients(torch.zeros(2, 3)), "square"),
        (lambda: min_norm_coefficients(gram, floor=0.34), "floor"),
        (lambda: min_norm_coefficients(gram, floor=-0.1), "floor"),
        (lambda: min_norm_coefficients(-gram), "positive semi-definite"),
        (lambda: min_norm_coefficients(gram * math.nan), "non-finite"),
        (lambda: min_norm_coefficients(gram, iters=0), "iters"),
        (lambda: project_to_simplex(torch.zeros(4), floor=0.3), "floor"),
        (lambda: project_to_simplex(torch.zeros(2, 2)), "v"),
        (lambda: marble_weights(torch.zeros(4)), "grads"),
        (lambda: marble_weights(torch.ones(3, 5), floor=0.5), "floor"),
        (lambda: gradient_cosines(torch.ones(3, 5), torch.ones(4)), "update"),
        (lambda: smooth_coefficients(None, torch.ones(2), rho=1.0), "rho"),
        (lambda: smooth_coefficients(None, torch.ones(2), rho=-0.1), "rho"),
        (lambda: smooth_coefficients(torch.ones(3), torch.ones(2)), "previous"),
        (lambda: blend_advantages(torch.ones(4, 3), torch.ones(2)), "alpha"),
        (lambda: blend_advantages(torch.ones(4), torch.ones(1)), "advantages"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word) as info:
            call()
        assert "\n" not in str(info.value)
