"""SOAR (arXiv 2604.12617): the auxiliary points against the official code's formulas on SD3
(``Tencent-Hunyuan/HY-SOAR`` ``soar/utils/algorithm.py``), the invariants of the target (on-ray points, one step back
lands on x0, s' in range, the normaliser) on SD3 and SD (ε and v), the DDIM reading of the one-step rollout, and λ = 0
== SFT."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from helpers_adapters import sd3_adapter

from diffalign.config_fields import Checker, ConfigError, check_section
from diffalign.losses.soar import soar_loss
from diffalign.models.diffusion import SDAdapter
from diffalign.models.sd3 import SD3Adapter
from diffalign.models.soar import SOARSettings, grid_positions, soar_aux_points
from diffalign.models.tiny import tiny_sd_components
from diffalign.models.tiny_sd3 import tiny_sd3_components
from diffalign.utils.randomness import per_sample_normal

B = 3


def _sd3(shift: float = 3.0) -> SD3Adapter:
    c = tiny_sd3_components(sample_size=8, with_vae=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return sd3_adapter({**c, "scheduler": scheduler})


def _sd(prediction_type: str) -> SDAdapter:
    c = tiny_sd_components(prediction_type=prediction_type)
    return SDAdapter(c["unet"], c["scheduler"], vae=None, text_encoder=c["text_encoder"], tokenizer=c["tokenizer"])


def _batch(adapter, shape, timesteps):
    x0 = per_sample_normal(shape, 5, 0, range(B)).clamp(-1, 1)
    noise = per_sample_normal(shape, 6, 0, range(B))
    cond = adapter.encode_prompts(["a red circle", "a blue square", "a green triangle"])
    uncond = adapter.encode_prompts([""])
    return x0, noise, torch.as_tensor(timesteps), cond, uncond


class Oracle(torch.nn.Module):
    """A denoiser that returns the exact target of the stored (x0, noise) at the timesteps it is called with."""

    def __init__(self, adapter, x0, noise, like):
        super().__init__()
        self.adapter, self.x0, self.noise, self.weight = adapter, x0, noise, torch.nn.Parameter(torch.zeros(()))
        self.config = like.config

    def forward(self, sample=None, timestep=None, encoder_hidden_states=None, hidden_states=None, **_):
        x = sample if sample is not None else hidden_states
        reps = x.shape[0] // self.x0.shape[0]
        t = timestep.reshape(reps, -1)[0]
        return (self.adapter.target(self.x0, self.noise, t).repeat(reps, 1, 1, 1),)


def test_sd3_points_follow_the_official_code():
    adapter = _sd3()
    settings = SOARSettings(num_aux_points=4, num_sampling_steps=40, cfg_scale=4.5)
    sched = adapter.scheduler
    positions = [0, 500, 990]  # pure noise, middle, and one past the clean boundary (t1 = 0)
    x0, noise, t0, cond, uncond = _batch(adapter, (3, 8, 8), sched.timesteps[positions])
    pts = soar_aux_points(adapter, x0, noise, t0, cond, uncond, settings, seed=0, epoch=0, indices=[0, 1, 2])

    # the code's t / sigma conversions: indices = (1 - t) * T; t1 = max(t0 - 1/K, 0)
    T = len(sched.timesteps)
    t_code = 1.0 - (torch.tensor(positions, dtype=torch.float64) + 0.5) / T
    t1 = (t_code - 1.0 / 40).clamp_min(0.0)
    sigma1 = sched.sigmas[((1.0 - t1) * T).long().clamp(0, T - 1)]
    sigma0 = sched.sigmas[positions]
    with torch.no_grad():
        x_t = (1 - sigma0.view(-1, 1, 1, 1)) * x0 + sigma0.view(-1, 1, 1, 1) * noise
        v_c = adapter.predict(x_t, t0, cond).float()
        v_u = adapter.predict(x_t, t0, {k: v.expand(B, *v.shape[1:]) for k, v in uncond.items()}).float()
    v_cfg = v_u + 4.5 * (v_c - v_u)
    z_off = x_t + (sigma1 - sigma0).view(-1, 1, 1, 1).float() * v_cfg
    rows = pts.sample_index
    assert pts.sample_index.tolist() == [0, 1, 2] * 4
    torch.testing.assert_close(pts.start_sigmas, sigma1[rows].float())
    torch.testing.assert_close(pts.off_trajectory, z_off[rows], atol=2e-5, rtol=1e-5)
    s = pts.sigmas
    assert bool(((s >= pts.start_sigmas) & (s <= 1.0)).all())
    alpha = ((s - sigma1[rows]) / (1 - sigma1[rows])).view(-1, 1, 1, 1)
    z_aux = (1 - alpha) * z_off[rows] + alpha * noise[rows]
    torch.testing.assert_close(pts.inputs, z_aux, atol=2e-5, rtol=1e-5)
    snapped = torch.searchsorted(-sched.sigmas[:T], -s).clamp(0, T - 1)
    torch.testing.assert_close(pts.timesteps, sched.timesteps[snapped].float())
    torch.testing.assert_close(pts.targets, (z_aux - x0[rows]) / s.view(-1, 1, 1, 1), atol=2e-4, rtol=1e-4)
    # invariant (ii): one step back from each point lands on x0
    torch.testing.assert_close(pts.states - s.view(-1, 1, 1, 1) * pts.targets, x0[rows], atol=1e-5, rtol=1e-5)
    # addressed randomness: the same draws again, other draws in another epoch
    again = soar_aux_points(adapter, x0, noise, t0, cond, uncond, settings, seed=0, epoch=0, indices=[0, 1, 2])
    other = soar_aux_points(adapter, x0, noise, t0, cond, uncond, settings, seed=0, epoch=1, indices=[0, 1, 2])
    assert torch.equal(again.sigmas, pts.sigmas) and not torch.equal(other.sigmas, pts.sigmas)


def test_stochastic_paths_skip_samples_at_the_clean_boundary():
    adapter = _sd3()
    settings = SOARSettings(num_aux_points=2, num_paths=3, sde_type="cps")
    x0, noise, t0, cond, uncond = _batch(adapter, (3, 8, 8), adapter.scheduler.timesteps[[0, 500, 990]])
    pts = soar_aux_points(adapter, x0, noise, t0, cond, uncond, settings, seed=0, epoch=0, indices=[0, 1, 2])
    counts = torch.bincount(pts.sample_index, minlength=3).tolist()
    assert counts == [6, 6, 2]  # 3 paths x 2 points; the boundary sample keeps only the ODE path
    ode, stochastic = pts.off_trajectory[:3], pts.off_trajectory[6:8]
    assert not torch.allclose(ode[:2], stochastic)


@pytest.mark.parametrize("make", [lambda: _sd3(), lambda: _sd("epsilon"), lambda: _sd("v_prediction")])
def test_an_exact_model_gives_on_ray_points_and_flow_matching_targets(make):
    """Invariant (i): no one-step drift -> every auxiliary point is the forward-process state of the same (x0, ε)
    and its target is the plain training target."""
    adapter = make()
    shape = (3, 8, 8) if isinstance(adapter, SD3Adapter) else (4, 16, 16)
    grid = adapter.training_grid()
    x0, noise, t0, cond, uncond = _batch(adapter, shape, grid[[10, 400, 800]])
    adapter.denoiser = Oracle(adapter, x0, noise, adapter.denoiser)
    settings = SOARSettings(num_aux_points=5, num_sampling_steps=20, cfg_scale=4.5)
    pts = soar_aux_points(adapter, x0, noise, t0, cond, uncond, settings, seed=1, epoch=0, indices=[0, 1, 2])
    rows = pts.sample_index
    if isinstance(adapter, SD3Adapter):
        torch.testing.assert_close(pts.targets, (noise - x0)[rows], atol=1e-4, rtol=1e-4)
        s = pts.sigmas.view(-1, 1, 1, 1)
        torch.testing.assert_close(pts.inputs, (1 - s) * x0[rows] + s * noise[rows], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(pts.targets, adapter.target(x0[rows], noise[rows], pts.timesteps), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            pts.inputs, adapter.add_noise(x0[rows], noise[rows], pts.timesteps), atol=1e-5, rtol=0
        )
        # invariant (ii) in the model's own parameterisation
        clean, _ = adapter.clean_and_noise(pts.inputs, pts.targets, pts.timesteps)
        torch.testing.assert_close(clean, x0[rows], atol=1e-4, rtol=0)
    a, b = adapter.noise_coefficients(grid)
    s_grid = b / (a + b)
    assert bool(((pts.sigmas >= pts.start_sigmas - 1e-7) & (pts.sigmas <= s_grid[0] + 1e-7)).all())  # (iii)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_sd_one_step_rollout_is_a_ddim_step(prediction_type):
    adapter = _sd(prediction_type)
    x0, noise, t0, cond, uncond = _batch(adapter, (4, 16, 16), [999, 600, 130])
    settings = SOARSettings(num_aux_points=1, num_sampling_steps=10, cfg_scale=3.0)
    pts = soar_aux_points(adapter, x0, noise, t0, cond, uncond, settings, seed=0, epoch=0, indices=[0, 1, 2])
    ddim = DDIMScheduler.from_config(adapter.scheduler.config)
    ddim.set_timesteps(10)
    x_t = adapter.add_noise(x0, noise, t0)
    with torch.no_grad():
        out_c = adapter.predict(x_t, t0, cond).float()
        out_u = adapter.predict(x_t, t0, {k: v.expand(B, *v.shape[1:]) for k, v in uncond.items()}).float()
    guided = out_u + 3.0 * (out_c - out_u)
    for i in range(B):
        step = ddim.step(guided[i : i + 1], int(t0[i]), x_t[i : i + 1], eta=0.0).prev_sample
        t1 = int(t0[i]) - 100
        a1, b1 = adapter.noise_coefficients(torch.tensor([t1]))
        torch.testing.assert_close(pts.off_trajectory[i : i + 1] * (a1 + b1), step, atol=1e-5, rtol=1e-5)
        expected_start = (b1 / (a1 + b1)).item()
        assert pts.start_sigmas[i].item() == pytest.approx(expected_start, abs=1e-6)


def test_grid_positions_and_loss_normaliser():
    adapter = _sd3()
    grid = adapter.training_grid()
    assert grid_positions(grid, grid[[0, 7, 999]]).tolist() == [0, 7, 999]
    main, aux = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0, 6.0])
    assert soar_loss(main, aux, lambda_aux=0.5).item() == pytest.approx((3.0 + 0.5 * 18.0) / (2 + 0.5 * 4))  # (iv)
    assert soar_loss(main, aux, lambda_aux=0.0).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="lambda_aux"):
        soar_loss(main, aux, lambda_aux=-1.0)
    bad = SimpleNamespace(soar=SOARSettings(sde_type="euler"))  # the section's Literal, checked with the config's
    with pytest.raises(ConfigError, match="'soar.sde_type' must be one of 'simple', 'sde', 'flow_sde', 'cps'; got"):
        check_section(Checker(bad, {}, "<test>"), "soar", bad.soar)
    assert math.isclose(float(adapter.scheduler.sigmas[0]), 1.0)


@pytest.mark.parametrize("family", ["soar", "sail"])
def test_the_evidence_command_dispatches_and_checks_methods(family):
    from argparse import Namespace

    from diffalign.cli import _evidence

    args = Namespace(
        family=family, methods="bogus", n_per_prompt=2, overrides=[], output_dir=None, segments=1, seeds=1, pairs=None,
        merge=None,
    )
    with pytest.raises(ValueError, match=f"unknown {family} methods"):
        _evidence(args)
