"""Samplers with log-probs: parity with diffusers' schedulers and the papers' formulas, and the on-policy ratio."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from helpers_adapters import sd3_adapter

from diffalign.models.diffusion import SDAdapter
from diffalign.models.flux import FluxAdapter
from diffalign.models.rollout import SamplerSettings, build_schedule, conditioning, rollout, step_log_prob
from diffalign.models.sampling import cps_step, dance_sde_step, dance_sigmas, ddim_step, flow_sde_step
from diffalign.models.sd3 import SD3Adapter
from diffalign.models.tiny import tiny_sd_components
from diffalign.models.tiny_flux import tiny_flux_components
from diffalign.models.tiny_sd3 import tiny_sd3_components


def _flow_schedule(steps: int = 10, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def test_flow_ode_step_is_the_scheduler_euler_step():
    scheduler = _flow_schedule()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    for k, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=gen)
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        step = flow_sde_step(v, x, scheduler.sigmas[k], scheduler.sigmas[k + 1], noise_level=0.0, sigma_max=1.0)
        torch.testing.assert_close(step.prev_sample, expected, rtol=0, atol=1e-6)
        assert torch.equal(step.log_prob, torch.zeros(3))
        x = expected


def test_flow_sde_step_formula_and_gaussian_log_prob():
    scheduler = _flow_schedule()
    sigmas = scheduler.sigmas
    gen = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    a = 0.7
    for k in (0, 4, 9):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        step = flow_sde_step(v, x, s, s_next, noise_level=a, sigma_max=float(sigmas[1]), noise=z)
        s_safe = float(sigmas[1]) if s == 1.0 else s
        std_dev_t = a * math.sqrt(s / (1 - s_safe))
        dt = s_next - s
        mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
        std = std_dev_t * math.sqrt(-dt)
        torch.testing.assert_close(step.mean, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(step.prev_sample, mean + std * z, rtol=1e-6, atol=1e-6)
        expected_logp = torch.distributions.Normal(mean, std).log_prob(mean + std * z).flatten(1).mean(1)
        torch.testing.assert_close(step.log_prob, expected_logp, rtol=1e-5, atol=1e-5)
        assert step.std_dev_t[0].item() == pytest.approx(std_dev_t, rel=1e-6)
        assert step.sqrt_dt[0].item() == pytest.approx(math.sqrt(-dt), rel=1e-6)


def test_dance_step_is_flow_grpo_with_constant_coefficient():
    scheduler = _flow_schedule(16)
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    eta = 0.3
    for k in (0, 7, 15):
        s, s_next = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
        dance = dance_sde_step(v, x, s, s_next, eta=eta)
        dt = s_next - s
        flow_mean_with_eta = x + (v + eta**2 / (2 * s) * (x + (1 - s) * v)) * dt
        torch.testing.assert_close(dance.mean, flow_mean_with_eta, rtol=1e-6, atol=1e-6)
        assert dance.std[0].item() == pytest.approx(eta * math.sqrt(s - s_next), rel=1e-6)


def test_cps_step_formula():
    gen = torch.Generator().manual_seed(3)
    x, v, z = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    s, s_next, a = 0.8, 0.6, 0.8
    step = cps_step(v, x, s, s_next, noise_level=a, noise=z)
    std = s_next * math.sin(a * math.pi / 2)
    mean = (1 - s_next) * (x - s * v) + math.sqrt(s_next**2 - std**2) * (x + (1 - s) * v)
    torch.testing.assert_close(step.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.log_prob, -((std * z) ** 2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(prediction_type: str, eta: float):
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    scheduler.set_timesteps(20)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for t in scheduler.timesteps[:-1]:  # the last step: DDPO clamps t_prev at 0, diffusers uses final_alpha_cumprod
        out, z = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
        expected = scheduler.step(out, t, x, eta=eta, variance_noise=z, return_dict=False)[0]
        prev_t = t - 1000 // 20
        step = ddim_step(
            out,
            x,
            scheduler.alphas_cumprod[t],
            scheduler.alphas_cumprod[prev_t],
            eta=eta,
            prediction_type=prediction_type,
            noise=z,
        )
        torch.testing.assert_close(step.prev_sample, expected, rtol=1e-5, atol=1e-5)
        if eta > 0:
            manual = torch.distributions.Normal(step.mean, step.std[0]).log_prob(step.prev_sample).flatten(1).mean(1)
            torch.testing.assert_close(step.log_prob, manual, rtol=1e-5, atol=1e-5)
        x = expected


def _sd3_adapter(with_vae: bool = True) -> SD3Adapter:
    return sd3_adapter(tiny_sd3_components(with_vae=with_vae))


def _sd_adapter(prediction_type: str) -> SDAdapter:
    c = tiny_sd_components(prediction_type=prediction_type)
    return SDAdapter(c["unet"], c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"])


@pytest.mark.parametrize(
    "make, settings",
    [
        (lambda: _sd3_adapter(), SamplerSettings(kind="sde", steps=4, guidance_scale=4.5, resolution=32)),
        (
            lambda: _sd3_adapter(),
            SamplerSettings(kind="cps", steps=4, guidance_scale=1.0, noise_level=0.8, resolution=32),
        ),
        (
            lambda: _sd3_adapter(False),
            SamplerSettings(kind="dance", steps=4, guidance_scale=3.0, noise_level=0.3, resolution=32),
        ),
        (
            lambda: _sd_adapter("epsilon"),
            SamplerSettings(kind="ddim", steps=4, guidance_scale=5.0, noise_level=1.0, resolution=16),
        ),
        (
            lambda: _sd_adapter("v_prediction"),
            SamplerSettings(kind="ddim", steps=4, guidance_scale=5.0, noise_level=1.0, resolution=16),
        ),
    ],
)
def test_reevaluating_a_rollout_gives_ratio_exactly_one(make, settings):
    torch.manual_seed(0)
    adapter = make()
    prompts = ["a red circle", "a blue square", "a red circle"]
    traj = rollout(adapter, prompts, settings, seed=7, indices=[0, 1, 2], keep_means=True)
    assert traj.latents.shape[1] == settings.steps + 1 and traj.log_probs.shape == (3, settings.steps)
    assert traj.images.shape[1] == 3 and 0.0 <= traj.images.min() and traj.images.max() <= 1.0
    schedule = build_schedule(adapter, settings)
    cond = conditioning(adapter, prompts, settings.resolution)
    uncond = None
    if settings.guidance_scale != 1.0:
        uncond = {k: v.expand(3, *v.shape[1:]) for k, v in conditioning(adapter, [""], settings.resolution).items()}
    for k in range(settings.steps):
        if not traj.stochastic[k]:
            continue
        with torch.no_grad():
            step = step_log_prob(
                adapter, settings, schedule, k, traj.latents[:, k], traj.latents[:, k + 1], cond, uncond
            )
        assert torch.equal(step.log_prob, traj.log_probs[:, k]), k  # exp(0) = 1 exactly
        assert torch.equal(step.mean, traj.means[:, k])


def test_rollouts_are_addressed_per_sample_and_groups_can_share_noise():
    adapter = _sd3_adapter(False)
    settings = SamplerSettings(kind="sde", steps=3, guidance_scale=1.0, resolution=32)
    both = rollout(adapter, ["a red circle", "a red circle"], settings, seed=3, indices=[5, 6])
    alone = rollout(adapter, ["a red circle"], settings, seed=3, indices=[6])
    torch.testing.assert_close(both.latents[1:], alone.latents, rtol=0, atol=1e-5)
    shared = rollout(adapter, ["a red circle"] * 2, settings, seed=3, indices=[5, 6], noise_indices=[9, 9])
    assert torch.equal(shared.latents[0, 0], shared.latents[1, 0])
    assert not torch.equal(shared.latents[0, -1], shared.latents[1, -1])  # the SDE noise still differs


def test_windowed_sde_is_deterministic_outside_the_window():
    adapter = _sd3_adapter(False)
    settings = SamplerSettings(kind="sde", steps=5, guidance_scale=1.0, resolution=32)
    traj = rollout(adapter, ["a red circle"], settings, seed=0, indices=[0], window=(1, 3))
    assert traj.stochastic.tolist() == [False, True, True, False, False]
    assert torch.equal(traj.log_probs[:, 0], torch.zeros(1)) and (traj.log_probs[:, 1:3] != 0).all()


def test_ode_rollout_matches_the_diffusers_sd3_pipeline():
    c = tiny_sd3_components()
    adapter = sd3_adapter(c, max_sequence_length=77)
    settings = SamplerSettings(kind="ode", steps=4, guidance_scale=4.5, resolution=32)
    traj = rollout(adapter, ["a red circle", "a blue square"], settings, seed=1, indices=[0, 1])
    pipe = StableDiffusion3Pipeline(**{k: v for k, v in c.items()})
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red circle", "a blue square"],
        latents=traj.latents[:, 0],
        num_inference_steps=4,
        guidance_scale=4.5,
        height=32,
        width=32,
        output_type="pt",
        max_sequence_length=77,
    ).images
    torch.testing.assert_close(traj.images, images.float(), rtol=0, atol=1e-4)


def _dance_grid_by_hand(steps: int, shift: float) -> list[float]:
    """DanceGRPO's ``sd3_time_shift(shift, linspace(1, 0, S + 1))``, element by element in Python floats."""
    grid = [1.0 - k / steps for k in range(steps + 1)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in grid]


def test_dance_sigmas_are_danceGRPOs_shifted_linspace_not_the_pipeline_grid():
    timesteps, sigmas = dance_sigmas(16, 3.0)
    expected = torch.tensor(_dance_grid_by_hand(16, 3.0))
    assert sigmas.shape == (17,) and timesteps.shape == (16,)
    torch.testing.assert_close(sigmas, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(timesteps, expected[:-1] * 1000, rtol=0, atol=1e-4)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    pipeline = _flow_schedule(16, 3.0).sigmas  # SD3's set_timesteps grid
    gap = (pipeline - sigmas).abs().max().item()
    assert 0.15 < gap < 0.17, f"dance vs pipeline sigmas: max |difference| {gap:.4f}"
    assert (pipeline - sigmas).abs().argmax().item() == 15, "the largest gap is the second-to-last sigma"
    with pytest.raises(ValueError, match="dance_sigmas"):
        dance_sigmas(0, 3.0)


def test_build_schedule_gives_dance_its_grid_and_the_pipeline_grid_on_request():
    adapter = _sd3_adapter(False)
    dance = SamplerSettings(kind="dance", steps=16, guidance_scale=1.0, noise_level=0.3, resolution=32)
    sde = SamplerSettings(kind="sde", steps=16, guidance_scale=1.0, resolution=32)
    expected_t, expected_sigmas = dance_sigmas(16, 3.0)
    schedule = build_schedule(adapter, dance)
    assert torch.equal(schedule.sigmas, expected_sigmas) and torch.equal(schedule.timesteps, expected_t)
    pipeline_t, pipeline_sigmas = adapter.sampling_schedule(16, 32)
    for settings in (sde, dance):  # every other sampler keeps the pipeline grid; dance takes it when asked
        chosen = build_schedule(adapter, settings, "pipeline" if settings.kind == "dance" else None)
        assert torch.equal(chosen.sigmas, pipeline_sigmas) and torch.equal(chosen.timesteps, pipeline_t)
    assert torch.equal(build_schedule(adapter, sde, "dance").sigmas, expected_sigmas)
    with pytest.raises(ValueError, match="sigma schedule 'linear'"):
        build_schedule(adapter, dance, "linear")


def test_dance_grid_on_a_dynamically_shifted_scheduler_uses_the_static_config_shift():
    c = tiny_flux_components()
    adapter = FluxAdapter(c["transformer"], c["scheduler"])
    assert adapter.scheduler.config.use_dynamic_shifting and adapter.scheduler.config.shift == 3.0
    settings = SamplerSettings(kind="dance", steps=16, guidance_scale=1.0, noise_level=0.3, resolution=32)
    schedule = build_schedule(adapter, settings)
    torch.testing.assert_close(schedule.sigmas, torch.tensor(_dance_grid_by_hand(16, 3.0)), rtol=0, atol=1e-6)
    pipeline = build_schedule(adapter, settings, "pipeline").sigmas  # FLUX's mu from the image size
    assert (pipeline - schedule.sigmas).abs().max().item() > 0.05


def test_a_dance_rollout_runs_on_its_grid_and_reevaluates_bit_for_bit():
    torch.manual_seed(0)
    adapter = _sd3_adapter(False)
    settings = SamplerSettings(kind="dance", steps=6, guidance_scale=2.0, noise_level=0.3, resolution=32)
    prompts = ["a red circle", "a blue square"]
    traj = rollout(adapter, prompts, settings, seed=5, indices=[0, 1], keep_means=True)
    _, sigmas = dance_sigmas(6, 3.0)
    torch.testing.assert_close(traj.sqrt_dt, torch.sqrt(sigmas[:-1] - sigmas[1:]), rtol=1e-6, atol=0)
    assert torch.equal(traj.std_dev_t, torch.full((6,), 0.3))
    schedule = build_schedule(adapter, settings)
    cond = conditioning(adapter, prompts, settings.resolution)
    uncond = {k: v.expand(2, *v.shape[1:]) for k, v in conditioning(adapter, [""], settings.resolution).items()}
    for k in range(settings.steps):
        with torch.no_grad():
            step = step_log_prob(
                adapter, settings, schedule, k, traj.latents[:, k], traj.latents[:, k + 1], cond, uncond
            )
        assert torch.equal(step.log_prob, traj.log_probs[:, k]), k
        assert torch.equal(step.mean, traj.means[:, k]), k
