"""The toy flow base (SD3-style transformer): layout, conditioning parity with diffusers, samplers, pretraining."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from diffalign.toy import flow_pretrain
from diffalign.toy.flow_model import (
    T5_TOKENS,
    build_toy_flow_model,
    load_toy_flow_model,
    predict_velocity,
    save_toy_flow_model,
)
from diffalign.toy.flow_pretrain import (
    FlowPretrainConfig,
    ensure_flow_base,
    flow_matching_loss,
    pretrain_flow,
    sample_training_sigmas,
)
from diffalign.toy.flow_sampling import evaluate_flow_model, generate, sde_step
from diffalign.toy.world import all_prompts, render_batch, sample_specs

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def model():
    return build_toy_flow_model(seed=0)


def _inputs(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.rand(n, generator=g)


def test_save_load_round_trip_and_generic_loaders(model, tmp_path):
    path = save_toy_flow_model(model, tmp_path / "flow", extra_info={"note": 1})
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "DiffalignToyFlowPipeline"
    assert index["vae"] == index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    assert index["diffalign"]["max_sequence_length"] == T5_TOKENS and index["diffalign"]["note"] == 1
    assert not (path / "vae").exists()
    loaded = load_toy_flow_model(path)
    x, sigma = _inputs()
    with torch.no_grad():
        embeds, pooled = model.encode_prompts(PROMPTS)
        embeds2, pooled2 = loaded.encode_prompts(PROMPTS)
        assert torch.equal(embeds, embeds2) and torch.equal(pooled, pooled2)
        assert torch.equal(model.predict(x, sigma, embeds, pooled), loaded.predict(x, sigma, embeds, pooled))
    # What a generic SD3 loader does: each component from its subfolder.
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
    assert transformer.config.in_channels == 3 and transformer.config.sample_size == 16
    assert 0.7e6 < sum(p.numel() for p in transformer.parameters()) < 1.2e6
    assert CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").config.projection_dim == 32
    assert CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2").model_max_length == 8
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler").config.shift == 1.0


def test_conditioning_equals_diffusers_sd3_encode_prompt(model):
    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer,
        scheduler=model.scheduler,
        vae=None,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, device=torch.device("cpu"), max_sequence_length=T5_TOKENS
        )
        ours, ours_pooled = model.encode_prompts(PROMPTS)
        uncond, uncond_pooled = model.encode_prompts([""] * len(PROMPTS))
    assert ours.shape == (3, 8 + T5_TOKENS, 128) and ours_pooled.shape == (3, 64)
    torch.testing.assert_close(ours, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours_pooled, pooled, rtol=0, atol=0)
    torch.testing.assert_close(uncond, neg_embeds, rtol=0, atol=0)
    torch.testing.assert_close(uncond_pooled, neg_pooled, rtol=0, atol=0)
    assert ours[:, 8:].abs().max() == 0 and ours[:, :8, 64:].abs().max() == 0  # T5 stand-in and feature padding
    assert not torch.allclose(ours[0], ours[1])


def test_sde_step_at_zero_noise_is_the_scheduler_euler_step():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    for k, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 3, 16, 16, generator=g)
        euler = scheduler.step(v, t, x, return_dict=False)[0]
        step = sde_step(v, x, scheduler.sigmas[k], scheduler.sigmas[k + 1], noise_level=0.0, sigma_max=0.9)
        torch.testing.assert_close(step.prev_sample, euler, rtol=0, atol=1e-6)
        x = euler


def test_sde_step_formula_and_log_prob():
    g = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(2, 3, 16, 16, generator=g) for _ in range(3))
    sigma_max, a = 0.9, 0.7
    for sigma, nxt in ((1.0, 0.9), (0.5, 0.4), (0.05, 0.0)):
        out = sde_step(v, x, sigma, nxt, noise_level=a, sigma_max=sigma_max, noise=z)
        std_dev_t = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1.0 else sigma)))
        dt = nxt - sigma
        # Flow-GRPO's form: mu = x + [v + s_t^2/(2 sigma) (x + (1 - sigma) v)] dt
        mean = x + (v + std_dev_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
        std = std_dev_t * math.sqrt(-dt)
        torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.prev_sample, mean + std * z, rtol=1e-5, atol=1e-5)
        normal = torch.distributions.Normal(out.mean, std)
        torch.testing.assert_close(out.log_prob, normal.log_prob(out.prev_sample).mean((1, 2, 3)))


def test_generate_deterministic_and_batch_independent(model):
    for level in (0.0, 0.7):
        a = generate(model, PROMPTS, seed=3, steps=2, noise_level=level, batch_size=3)
        b = generate(model, PROMPTS, seed=3, steps=2, noise_level=level, batch_size=2)
        assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a, generate(model, PROMPTS, seed=4, steps=2, noise_level=0.7))


def test_logit_normal_timesteps_centre_on_half():
    idx = sample_training_sigmas(FlowPretrainConfig(), 1000, 0, list(range(2000)))
    assert idx.min() >= 0 and idx.max() <= 999 and 450 < idx.float().median() < 550
    assert ((idx < 100) | (idx > 900)).float().mean() < 0.1  # logit-normal: the ends are rare (uniform: 20%)


def test_tiny_pretrain_lowers_the_flow_loss(tmp_path):
    overrides = {"steps": 40, "batch_size": 16, "n_images": 64, "warmup_steps": 5, "ema_decay": 0.0, "seed": 0}
    path = pretrain_flow(tmp_path / "tiny", progress=False, **overrides)
    g = torch.Generator().manual_seed(123)
    x0 = render_batch(sample_specs(24, seed=7)) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.linspace(0.05, 0.95, 24)
    losses = []
    for m in (build_toy_flow_model(seed=0), load_toy_flow_model(path)):
        embeds, pooled = m.encode_prompts([all_prompts()[i % 12] for i in range(24)])
        with torch.no_grad():
            losses.append(flow_matching_loss(m, x0, noise, sigma, embeds, pooled).item())
    assert losses[1] < 0.6 * losses[0], losses


def test_ensure_flow_base_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(flow_pretrain, "default_flow_base_path", lambda: tmp_path / "absent")
    target = tmp_path / f"flow-base-{flow_pretrain.FLOW_BASE_CONFIG.hash()}"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    monkeypatch.setattr(flow_pretrain, "pretrain_flow", lambda *a, **k: pytest.fail("must not pretrain"))
    assert ensure_flow_base(tmp_path) == target
    assert FlowPretrainConfig(steps=10).hash() != flow_pretrain.FLOW_BASE_CONFIG.hash()


def test_predict_velocity_passes_sigma_times_1000(model):
    x, _ = _inputs(2)
    embeds, pooled = model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        ours = predict_velocity(model.transformer, x, torch.tensor([0.25, 0.5]), embeds, pooled)
        ref = model.transformer(
            hidden_states=x,
            timestep=torch.tensor([250.0, 500.0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.slow
def test_flow_base_adherence_between_chance_and_perfect(tmp_path):
    metrics = evaluate_flow_model(ensure_flow_base(tmp_path), n_per_prompt=16)  # pretrains (~6 min, one thread)
    assert 0.35 < metrics["adherence"] < 0.8 and metrics["shape_adherence"] > 0.6, metrics
