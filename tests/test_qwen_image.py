"""Qwen-Image on the flow layer, against diffusers' QwenImagePipeline on a tiny model saved and loaded back through
the same from_pretrained path a hub id takes: conditioning (padded to a fixed length with its mask), the VAE's latent
normalisation, sampling sigmas, the ODE rollout's image with and without true CFG, log-prob re-evaluation, LoRA
outputs, and the DPO / GRPO trainers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from helpers_config import tiny_lora_config
from helpers_flow import add_perturbed_lora, assert_steps_rescore_exactly

from diffalign.config import load_config
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.models.backbones import backbone_for
from diffalign.models.loading import detect_backbone, load_adapter
from diffalign.models.lora import save_lora
from diffalign.models.qwen_image import QwenImageAdapter
from diffalign.models.rollout import SamplerSettings, conditioning, rollout
from diffalign.models.tiny_qwen_image import QWEN_IMAGE_LORA_TARGETS, save_tiny_qwen_image_pipeline
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.run import train

PROMPTS = ["a red circle", "a big blue square on the left of a small green tree"]  # different token counts
RESOLUTION, SEQ = 32, 32  # 32 px / VAE 4 = 8x8 latents = 16 packed tokens
REWARD = str(Path(__file__).with_name("online_rewards.py")) + ":mean_colour"


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_image")
    (root / "prompts.txt").write_text("\n".join(PROMPTS * 2) + "\n")
    pairs = root / "pairs.parquet"
    rows = make_random_pairs(4, size=40, seed=0)
    for i, row in enumerate(rows):
        row["caption_0"] = row["caption_1"] = f"caption {i}"
    write_pickapic_parquet(pairs, rows)
    return {"model": save_tiny_qwen_image_pipeline(root / "model"), "prompts": root / "prompts.txt", "pairs": pairs}


@pytest.fixture(scope="module")
def pipe(qwen_dirs) -> QwenImagePipeline:
    pipeline = QwenImagePipeline.from_pretrained(qwen_dirs["model"])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _adapter(path: Path) -> QwenImageAdapter:
    adapter = load_adapter(path, max_sequence_length=SEQ)
    assert isinstance(adapter, QwenImageAdapter)
    return adapter


def _pipeline_images(pipe: QwenImagePipeline, x0: torch.Tensor, steps: int, cfg: float = 1.0) -> torch.Tensor:
    """QwenImagePipeline's images from our (B, C, H, W) initial latents, packed as its prepare_latents does; true CFG
    with the empty negative prompt when ``cfg`` > 1."""
    b, c, h, w = x0.shape
    negative = {"negative_prompt": [""] * b, "true_cfg_scale": cfg} if cfg > 1 else {"true_cfg_scale": 1.0}
    out = pipe(
        prompt=PROMPTS,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        latents=QwenImagePipeline._pack_latents(x0, b, c, h, w),
        output_type="pt",
        max_sequence_length=SEQ,
        **negative,
    )
    return out.images


def test_a_qwen_image_folder_is_detected_and_its_conditioning_is_the_pipelines_encode_prompt(qwen_dirs, pipe):
    assert detect_backbone(qwen_dirs["model"]) == "qwen_image"
    adapter = _adapter(qwen_dirs["model"])
    assert backbone_for(adapter).lora_targets == QWEN_IMAGE_LORA_TARGETS
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)
    lengths = mask.sum(dim=1)
    assert lengths[0] < lengths[1] <= SEQ  # the pipeline pads the short prompt to the batch's longest
    assert cond["encoder_hidden_states"].shape == (2, SEQ, 32) and cond["encoder_hidden_states_mask"].shape == (2, SEQ)
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(cond["encoder_hidden_states"][i, :n], embeds[i, :n])
        assert torch.equal(cond["encoder_hidden_states_mask"][i, :n], torch.ones(n, dtype=torch.long))
        assert not cond["encoder_hidden_states_mask"][i, n:].any() and not cond["encoder_hidden_states"][i, n:].any()
    # one prompt alone: the pipeline returns no mask (all ones); ours is padded to the same fixed length
    single = adapter.encode_prompts([""])
    with torch.no_grad():
        alone, none = pipe.encode_prompt([""], max_sequence_length=SEQ)
    assert none is None and single["encoder_hidden_states_mask"].sum() == alone.shape[1]
    assert torch.equal(single["encoder_hidden_states"][0, : alone.shape[1]], alone[0])
    # so that conditionings of different calls concatenate into one batch
    assert torch.cat([cond["encoder_hidden_states"], single["encoder_hidden_states"]]).shape == (3, SEQ, 32)


def test_padded_masked_text_gives_the_unpadded_prediction(qwen_dirs, pipe):
    adapter = _adapter(qwen_dirs["model"])
    cond = adapter.encode_prompts(PROMPTS)
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([700.0, 300.0])
    tokens = QwenImagePipeline._pack_latents(x, 2, 16, 8, 8)
    with torch.no_grad():
        padded = pipe.transformer(  # the full fixed-length padding, no columns cut
            hidden_states=tokens,
            timestep=t / 1000,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]
        ours = adapter.predict(x, t, cond)
        for i, prompt in enumerate(PROMPTS):  # the pipeline's call for one prompt: unpadded, mask None
            embeds, mask = pipe.encode_prompt([prompt], max_sequence_length=SEQ)
            alone = pipe.transformer(
                hidden_states=tokens[i : i + 1],
                timestep=t[i : i + 1] / 1000,
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=[[(1, 4, 4)]],
                return_dict=False,
            )[0]
            assert mask is None and (padded[i : i + 1] - alone).abs().max().item() < 1e-5
            unpacked = QwenImagePipeline._unpack_latents(alone, 8, 8, 1)[:, :, 0]
            assert (ours[i : i + 1] - unpacked).abs().max().item() < 1e-5


def test_the_vae_normalisation_and_the_sampling_sigmas_are_the_pipelines(qwen_dirs, pipe):
    adapter = _adapter(qwen_dirs["model"])
    assert adapter.vae_scale_factor == pipe.vae_scale_factor == 4
    assert adapter.latent_shape(RESOLUTION, RESOLUTION) == (16, 8, 8) and adapter.image_seq_len(32, 32) == 16
    with pytest.raises(ValueError, match="divisible by 2 x the VAE scale factor 4"):
        adapter.latent_shape(36, 36)
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = adapter.encode_images(pixels)
    config = pipe.vae.config
    mode = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    expected = (mode - torch.tensor(config.latents_mean).view(1, 16, 1, 1)) / torch.tensor(config.latents_std).view(
        1, 16, 1, 1
    )
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    with torch.no_grad():  # decoding undoes the normalisation: the VAE's own decode of the posterior mean
        direct = pipe.vae.decode(mode.unsqueeze(2), return_dict=False)[0][:, :, 0]
        torch.testing.assert_close(adapter.decode_latents(latents), direct, rtol=0, atol=1e-5)
    steps = 6
    timesteps, sigmas = adapter.sampling_schedule(steps, RESOLUTION)
    reference = type(pipe.scheduler).from_config(pipe.scheduler.config)
    mu = calculate_shift(16, 256, 8192, 0.5, 0.9)
    retrieve_timesteps(reference, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(timesteps, reference.timesteps.float()) and torch.equal(sigmas, reference.sigmas.float())
    plain = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)  # exponential shift, then shift_terminal
    shifted = math.exp(mu) / (math.exp(mu) + (1 / plain - 1))
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
    torch.testing.assert_close(sigmas[:-1].double(), stretched, rtol=0, atol=1e-6)
    assert sigmas[-2].item() == pytest.approx(0.02, abs=1e-6) and sigmas[-1].item() == 0.0


@pytest.mark.parametrize("cfg", [1.0, 4.0], ids=["no_cfg", "true_cfg"])
def test_an_ode_rollout_is_the_pipelines_image(qwen_dirs, pipe, cfg):
    adapter = _adapter(qwen_dirs["model"])
    ode = SamplerSettings(kind="ode", steps=4, guidance_scale=cfg, noise_level=0.0, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, ode, seed=3, indices=[0, 1])
    images = _pipeline_images(pipe, trajectory.latents[:, 0], steps=4, cfg=cfg)
    assert (images - trajectory.images).abs().max().item() <= 1e-4
    if cfg > 1:  # the renormalised combination keeps each packed token's conditional norm; plain CFG does not
        u, c = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
        guided = QwenImagePipeline._pack_latents(adapter.combine_guidance(u, c, cfg), 2, 16, 8, 8)
        cond_tokens = QwenImagePipeline._pack_latents(c, 2, 16, 8, 8)
        torch.testing.assert_close(guided.norm(dim=-1), cond_tokens.norm(dim=-1), rtol=1e-5, atol=1e-5)
        plain = QwenImagePipeline._pack_latents(u + cfg * (c - u), 2, 16, 8, 8)
        assert (plain.norm(dim=-1) - cond_tokens.norm(dim=-1)).abs().max().item() > 1e-2


def test_rescoring_an_sde_rollout_with_true_cfg_gives_its_log_probs(qwen_dirs):
    adapter = _adapter(qwen_dirs["model"])
    sde = SamplerSettings(kind="sde", steps=4, guidance_scale=4.0, noise_level=0.7, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, sde, seed=3, indices=[0, 1])
    assert_steps_rescore_exactly(adapter, sde, trajectory, conditioning(adapter, [""], RESOLUTION))


def test_a_lora_loads_with_load_lora_weights_and_generates_the_in_trainer_image(qwen_dirs, tmp_path):
    adapter = _adapter(qwen_dirs["model"])
    add_perturbed_lora(adapter, QWEN_IMAGE_LORA_TARGETS)  # a LoRA that changes the output
    save_lora(adapter.denoiser, tmp_path, pipeline_cls=QwenImagePipeline, component="transformer")
    ode = SamplerSettings(kind="ode", steps=3, guidance_scale=1.0, noise_level=0.0, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, ode, seed=5, indices=[0, 1])
    pipe = QwenImagePipeline.from_pretrained(qwen_dirs["model"])
    pipe.set_progress_bar_config(disable=True)
    plain = _pipeline_images(pipe, trajectory.latents[:, 0], steps=3)
    pipe.load_lora_weights(str(tmp_path))
    loaded = _pipeline_images(pipe, trajectory.latents[:, 0], steps=3)
    assert (loaded - trajectory.images).abs().max().item() <= 1e-4
    assert (plain - trajectory.images).abs().max().item() > 1e-3  # the LoRA mattered
    targeted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if "lora_A" in n}
    assert any("transformer_blocks.0.attn.add_q_proj" in n for n in targeted)
    assert any("transformer_blocks.1.attn.to_out.0" in n for n in targeted)


def test_diffusion_dpo_starts_at_ln2(qwen_dirs, tmp_path):
    cfg = tiny_lora_config(str(qwen_dirs["model"]), str(qwen_dirs["pairs"]), tmp_path / "run", resolution=32)
    cfg.train.max_steps, cfg.loss.name, cfg.loss.beta = 2, "dpo", 100.0
    cfg.model.max_sequence_length = SEQ
    result = train(cfg)
    records = read_metrics(tmp_path / "run")
    assert result.global_step == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert records[1]["loss"] != pytest.approx(math.log(2), abs=1e-7)


def test_flow_grpo_with_true_cfg_runs_on_qwen_image(qwen_dirs, tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    overrides = [
        f"model.pretrained={qwen_dirs['model']}",
        f"model.max_sequence_length={SEQ}",
        f"data.path={qwen_dirs['prompts']}",
        f"data.resolution={RESOLUTION}",
        "optim.lr=1e-3",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.train_batch_size=2",
        "train.checkpointing_steps=2",
        "train.progress_bar=false",
        "train.method=grpo",
        f"online.reward_functions=[{REWARD}]",
        "online.sample_steps=3",
        "online.guidance_scale=4.0",
        "online.num_generations=2",
        "online.prompts_per_rollout=2",
        "online.timestep_fraction=0.67",
        "online.policy_loss=flow_grpo",
    ]
    train(load_config(path, overrides))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_every_trained_parameter_gets_a_gradient(qwen_dirs):
    """DDP needs a gradient for every trained parameter: the last block's text-output layers, whose output the
    transformer discards, are left out of the LoRA (and frozen under a full fine-tune)."""
    adapter = _adapter(qwen_dirs["model"])
    unused = adapter.unused_modules()
    assert unused and all(name.startswith("transformer_blocks.1.") for name in unused)  # the tiny model has 2 blocks
    add_perturbed_lora(adapter, (*QWEN_IMAGE_LORA_TARGETS, "txt_mlp.net.2"))
    excluded = {n for n, _ in adapter.denoiser.named_parameters() if any(u in n for u in unused)}
    assert not {n for n in excluded if "lora_" in n}  # no adapter on them
    x, t = torch.randn(2, *adapter.latent_shape(RESOLUTION, RESOLUTION)), torch.tensor([500.0, 700.0])
    adapter.predict(x, t, adapter.encode_prompts(PROMPTS)).float().pow(2).mean().backward()
    missing = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
