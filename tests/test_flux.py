"""FLUX.1 (dev and schnell) on the flow layer, against diffusers' FluxPipeline on tiny models saved and loaded back
through the same from_pretrained path a hub id takes: conditioning, packing, noising and sigmas, the ODE rollout's
image, log-prob re-evaluation, LoRA and full fine-tune outputs, and the online trainers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from helpers_flow import add_perturbed_lora, assert_steps_rescore_exactly

from diffalign.config import load_config
from diffalign.models.backbones import backbone_for
from diffalign.models.flux import FLUX_LORA_TARGETS, FluxAdapter
from diffalign.models.loading import detect_backbone, load_adapter
from diffalign.models.lora import save_lora
from diffalign.models.rollout import SamplerSettings, rollout
from diffalign.models.tiny_flux import save_tiny_flux_pipeline
from diffalign.trainers.run import train

PROMPTS = ["a red circle", "a blue square"]
RESOLUTION, SEQ = 32, 32
REWARD = str(Path(__file__).with_name("online_rewards.py")) + ":mean_colour"


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    (root / "prompts.txt").write_text("\n".join(PROMPTS * 2) + "\n")
    return {
        "dev": save_tiny_flux_pipeline(root / "dev"),
        "schnell": save_tiny_flux_pipeline(root / "schnell", guidance_embeds=False, seed=1),
        "prompts": root / "prompts.txt",
    }


def _adapter(path: Path, **options) -> FluxAdapter:
    adapter = load_adapter(path, max_sequence_length=SEQ, **options)
    assert isinstance(adapter, FluxAdapter)
    return adapter


def _pipeline(path: Path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe: FluxPipeline, x0: torch.Tensor, steps: int, guidance: float = 3.5) -> torch.Tensor:
    """FluxPipeline's images from our (B, C, H, W) initial latents, packed as its prepare_latents does."""
    b, c, h, w = x0.shape
    latents = FluxPipeline._pack_latents(x0, b, c, h, w)
    out = pipe(
        prompt=PROMPTS,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents,
        output_type="pt",
        max_sequence_length=SEQ,
    )
    return out.images


def test_a_flux_folder_is_detected_and_its_conditioning_is_the_pipelines_encode_prompt(flux_dirs):
    assert detect_backbone(flux_dirs["dev"]) == detect_backbone(flux_dirs["schnell"]) == "flux"
    adapter, pipe = _adapter(flux_dirs["dev"]), _pipeline(flux_dirs["dev"])
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["pooled_projections"], pooled)
    assert cond["encoder_hidden_states"].shape == (2, SEQ, 32) and torch.equal(text_ids, torch.zeros(SEQ, 3))
    assert backbone_for(adapter).lora_targets == FLUX_LORA_TARGETS and adapter.guidance_embeds


def test_packing_round_trips_and_the_latent_layout_is_the_pipelines(flux_dirs):
    adapter = _adapter(flux_dirs["dev"])
    assert adapter.latent_shape(RESOLUTION, RESOLUTION) == (4, 16, 16)  # 16 packed channels / 4, 32 px / VAE 2
    assert adapter.image_seq_len(RESOLUTION, RESOLUTION) == 64  # (16 / 2)^2 tokens, FluxPipeline's image_seq_len
    x = torch.randn(3, 4, 16, 16)
    tokens = FluxPipeline._pack_latents(x, 3, 4, 16, 16)
    assert tokens.shape == (3, 64, 16)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 16, 16, 1), x)
    assert torch.equal(tokens[0, 0], x[0, :, :2, :2].reshape(-1))  # token 0 = the top-left 2x2 patch, channel-major
    with pytest.raises(ValueError, match="divisible by 2 x the VAE scale factor"):
        adapter.latent_shape(34, 34)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_noising_and_sampling_sigmas_are_the_schedulers(flux_dirs, variant):
    adapter, pipe = _adapter(flux_dirs[variant]), _pipeline(flux_dirs[variant])
    x0, noise = torch.randn(4, 4, 16, 16), torch.randn(4, 4, 16, 16)
    timesteps = adapter.sample_timesteps(seed=0, epoch=0, indices=[0, 1, 2, 3])
    expected = torch.cat(
        [pipe.scheduler.scale_noise(x0[i : i + 1], timesteps[i : i + 1], noise[i : i + 1]) for i in range(4)]
    )
    torch.testing.assert_close(adapter.add_noise(x0, noise, timesteps), expected, rtol=0, atol=1e-6)
    steps = 6
    timesteps, sigmas = adapter.sampling_schedule(steps, RESOLUTION)
    reference = type(pipe.scheduler).from_config(pipe.scheduler.config)
    mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
    retrieve_timesteps(reference, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(timesteps, reference.timesteps.float()) and torch.equal(sigmas, reference.sigmas.float())
    if variant == "schnell":  # static shift 1.0: the plain linear sigmas
        torch.testing.assert_close(sigmas[:-1], torch.linspace(1.0, 1 / steps, steps), rtol=0, atol=1e-6)
    else:  # dynamic shift: exp(mu) / (exp(mu) + 1/sigma - 1)
        plain = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)
        shifted = math.exp(mu) / (math.exp(mu) + (1 / plain - 1))
        torch.testing.assert_close(sigmas[:-1].double(), shifted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_an_ode_rollout_is_the_pipelines_image_and_rescoring_it_gives_its_log_probs(flux_dirs, variant):
    adapter, pipe = _adapter(flux_dirs[variant]), _pipeline(flux_dirs[variant])
    ode = SamplerSettings(kind="ode", steps=4, guidance_scale=1.0, noise_level=0.0, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, ode, seed=3, indices=[0, 1])
    images = _pipeline_images(pipe, trajectory.latents[:, 0], steps=4)
    assert (images - trajectory.images).abs().max().item() <= 1e-4
    sde = SamplerSettings(kind="sde", steps=4, guidance_scale=1.0, noise_level=0.7, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, sde, seed=3, indices=[0, 1])
    assert_steps_rescore_exactly(adapter, sde, trajectory)


def test_guidance_distilled_flux_refuses_classifier_free_guidance(flux_dirs):
    adapter = _adapter(flux_dirs["dev"])
    settings = SamplerSettings(kind="ode", steps=2, guidance_scale=4.5, noise_level=0.0, resolution=RESOLUTION)
    with pytest.raises(ValueError, match="FluxAdapter is guidance-distilled.*guidance scale to 1"):
        rollout(adapter, PROMPTS, settings, seed=0, indices=[0, 1])
    # the embedding's value is model.guidance: a different value gives a different prediction
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 500.0])
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        base = adapter.predict(x, t, cond)
        adapter.guidance = 1.0
        assert not torch.allclose(adapter.predict(x, t, cond), base)


def test_a_lora_loads_with_load_lora_weights_and_generates_the_in_trainer_image(flux_dirs, tmp_path):
    adapter = _adapter(flux_dirs["dev"])
    add_perturbed_lora(adapter, FLUX_LORA_TARGETS)  # a LoRA that changes the output
    save_lora(adapter.denoiser, tmp_path, pipeline_cls=FluxPipeline, component="transformer")
    ode = SamplerSettings(kind="ode", steps=3, guidance_scale=1.0, noise_level=0.0, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, ode, seed=5, indices=[0, 1])
    pipe = _pipeline(flux_dirs["dev"])
    plain = _pipeline_images(pipe, trajectory.latents[:, 0], steps=3)
    pipe.load_lora_weights(str(tmp_path))
    loaded = _pipeline_images(pipe, trajectory.latents[:, 0], steps=3)
    assert (loaded - trajectory.images).abs().max().item() <= 1e-4
    assert (plain - trajectory.images).abs().max().item() > 1e-3  # the LoRA mattered
    targeted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if "lora_A" in n}
    assert any(".single_transformer_blocks.0.proj_mlp" in f".{n}" for n in targeted)
    assert any("transformer_blocks.0.attn.add_q_proj" in n for n in targeted)


def _flux_config(flux_dirs, out: Path, *extra: str):
    path = out.parent / f"{out.name}.yaml"
    path.write_text("{}\n")
    overrides = [
        f"model.pretrained={flux_dirs['dev']}",
        f"model.max_sequence_length={SEQ}",
        f"data.path={flux_dirs['prompts']}",
        f"data.resolution={RESOLUTION}",
        "optim.lr=1e-3",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.train_batch_size=2",
        "train.checkpointing_steps=2",
        "train.progress_bar=false",
        f"online.reward_functions=[{REWARD}]",
        "online.sample_steps=3",
        "online.guidance_scale=1.0",
        "online.num_generations=2",
        "online.prompts_per_rollout=2",
        "online.timestep_fraction=0.67",
    ]
    return load_config(path, [*overrides, *extra])


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        ("train.method=grpo", "online.policy_loss=flow_grpo"),
        ("train.method=grpo", "online.policy_loss=grpo_guard", "online.clip_range=2e-6"),
        ("train.method=grpo", "online.sampler=dance", "online.noise_level=0.3"),
        ("train.method=direct_reward", "online.sample_steps=2"),
    ],
    ids=["flow_grpo", "grpo_guard", "dance", "direct_reward"],
)
def test_the_online_trainers_run_on_flux(flux_dirs, tmp_path, extra):
    train(_flux_config(flux_dirs, tmp_path / "run", *extra))
    losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_a_full_fine_tune_loads_with_from_pretrained(flux_dirs, tmp_path):
    out = tmp_path / "full"
    cfg = _flux_config(flux_dirs, out, "train.method=grpo", "lora.enabled=false", "train.max_steps=1")
    train(cfg)
    trained = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer")
    base = FluxTransformer2DModel.from_pretrained(flux_dirs["dev"], subfolder="transformer")
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True)]
    assert any(moved) and trained.config.guidance_embeds
    pipe = FluxPipeline.from_pretrained(out)  # the run folder is a pipeline: the other components are the base's
    for a, b in zip(pipe.transformer.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)
