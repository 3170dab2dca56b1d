"""Z-Image on the flow layer, against diffusers' ZImagePipeline on a tiny model saved and loaded back through the
same from_pretrained path a hub id takes: conditioning, noising and sigmas, the ODE rollout's image without and with
classifier-free guidance, log-prob re-evaluation, LoRA output, and the offline and online trainers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps
from helpers_config import tiny_lora_config
from helpers_flow import add_perturbed_lora, assert_steps_rescore_exactly

from diffalign.config import load_config
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.models.backbones import backbone_for
from diffalign.models.loading import detect_backbone, load_adapter
from diffalign.models.lora import save_lora
from diffalign.models.rollout import SamplerSettings, conditioning, rollout
from diffalign.models.tiny_z_image import Z_IMAGE_LORA_TARGETS as TINY_TARGETS
from diffalign.models.tiny_z_image import save_tiny_z_image_pipeline
from diffalign.models.z_image import Z_IMAGE_LORA_TARGETS, ZImageAdapter
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.run import train

PROMPTS = ["a red circle", "a blue square on a green field"]
RESOLUTION, SEQ = 32, 32
REWARD = str(Path(__file__).with_name("online_rewards.py")) + ":mean_colour"


@pytest.fixture(scope="module")
def z_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("z_image")
    (root / "prompts.txt").write_text("\n".join(PROMPTS * 2) + "\n")
    rows = make_random_pairs(4, size=40, seed=0)
    for i, row in enumerate(rows):
        row["caption_0"], row["caption_1"] = f"caption {i} a", f"caption {i} b"
    write_pickapic_parquet(root / "pairs.parquet", rows)
    return {
        "model": save_tiny_z_image_pipeline(root / "model"),
        "prompts": root / "prompts.txt",
        "pairs": root / "pairs.parquet",
    }


def _adapter(path: Path) -> ZImageAdapter:
    adapter = load_adapter(path, max_sequence_length=SEQ)
    assert isinstance(adapter, ZImageAdapter)
    return adapter


def _pipeline(path: Path) -> ZImagePipeline:
    pipe = ZImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe: ZImagePipeline, x0: torch.Tensor, steps: int, guidance_scale: float) -> torch.Tensor:
    """ZImagePipeline's images from our (B, C, H, W) initial latents (its own layout)."""
    out = pipe(
        prompt=list(PROMPTS),
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=x0.clone(),
        output_type="pt",
        max_sequence_length=SEQ,
    )
    return out.images


def test_a_z_image_folder_is_detected_and_its_conditioning_is_the_pipelines_encode_prompt(z_dirs):
    assert detect_backbone(z_dirs["model"]) == "z_image"
    adapter, pipe = _adapter(z_dirs["model"]), _pipeline(z_dirs["model"])
    prompts = list(PROMPTS)
    cond = adapter.encode_prompts(prompts)
    assert prompts == PROMPTS  # the caller's list is not templated in place
    with torch.no_grad():
        embeds, negatives = pipe.encode_prompt(list(PROMPTS), max_sequence_length=SEQ)
    assert cond["cap_feats"].shape == (2, SEQ, 32) and cond["cap_lens"].tolist() == [e.shape[0] for e in embeds]
    assert cond["cap_lens"][0] != cond["cap_lens"][1]  # variable lengths
    for i, row in enumerate(embeds):
        n = row.shape[0]
        assert torch.equal(cond["cap_feats"][i, :n], row)
        assert not cond["cap_feats"][i, n:].any()  # zero padding
    empty = adapter.encode_prompts([""])
    assert torch.equal(empty["cap_feats"][0, : negatives[0].shape[0]], negatives[0])
    assert backbone_for(adapter).lora_targets == Z_IMAGE_LORA_TARGETS == TINY_TARGETS
    assert adapter.latent_shape(RESOLUTION, RESOLUTION) == (16, 16, 16) and adapter.image_seq_len(32, 32) == 64
    with pytest.raises(ValueError, match="divisible by 2 x the VAE scale factor"):
        adapter.latent_shape(34, 34)


def test_the_prediction_is_the_negated_transformer_output_and_ignores_the_padding(z_dirs):
    adapter = _adapter(z_dirs["model"])
    cond = adapter.encode_prompts(PROMPTS)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([750.0, 250.0])
    with torch.no_grad():
        pred = adapter.predict(x, t, cond)
        caps = [cond["cap_feats"][i, :n] for i, n in enumerate(cond["cap_lens"].tolist())]
        raw = adapter.denoiser(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, caps, return_dict=False)[0]
        assert torch.equal(pred, -torch.stack(raw).squeeze(2))
        rows = torch.arange(SEQ).expand(2, SEQ) < cond["cap_lens"][:, None]
        noisy = dict(cond, cap_feats=torch.where(rows[..., None], cond["cap_feats"], 1.0))  # padding := 1
        assert torch.equal(adapter.predict(x, t, noisy), pred)


def test_noising_and_sampling_sigmas_are_the_schedulers(z_dirs):
    adapter, pipe = _adapter(z_dirs["model"]), _pipeline(z_dirs["model"])
    x0, noise = torch.randn(4, 16, 16, 16), torch.randn(4, 16, 16, 16)
    timesteps = adapter.sample_timesteps(seed=0, epoch=0, indices=[0, 1, 2, 3])
    expected = torch.cat(
        [pipe.scheduler.scale_noise(x0[i : i + 1], timesteps[i : i + 1], noise[i : i + 1]) for i in range(4)]
    )
    torch.testing.assert_close(adapter.add_noise(x0, noise, timesteps), expected, rtol=0, atol=1e-6)
    for steps in (6, 9):
        timesteps, sigmas = adapter.sampling_schedule(steps, RESOLUTION)
        reference = type(pipe.scheduler).from_config(pipe.scheduler.config)
        mu = calculate_shift(64, 256, 4096, 0.5, 1.15)
        retrieve_timesteps(reference, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
        assert torch.equal(timesteps, reference.timesteps.float()) and torch.equal(sigmas, reference.sigmas.float())
        plain = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)  # static shift 3: 3s / (1 + 2s)
        torch.testing.assert_close(sigmas[:-1].double(), 3 * plain / (1 + 2 * plain), rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no_cfg", "cfg"])
def test_an_ode_rollout_is_the_pipelines_image(z_dirs, guidance):
    adapter, pipe = _adapter(z_dirs["model"]), _pipeline(z_dirs["model"])
    ode = SamplerSettings(kind="ode", steps=4, guidance_scale=guidance, noise_level=0.0, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, ode, seed=3, indices=[0, 1])
    images = _pipeline_images(pipe, trajectory.latents[:, 0], steps=4, guidance_scale=guidance - 1.0)
    assert (images - trajectory.images).abs().max().item() <= 1e-4
    if guidance != 1.0:  # guidance matters: the unguided pipeline image is a different one
        plain = _pipeline_images(pipe, trajectory.latents[:, 0], steps=4, guidance_scale=0.0)
        assert (plain - trajectory.images).abs().max().item() > 1e-3


def test_rescoring_an_sde_rollout_gives_its_log_probs(z_dirs):
    adapter = _adapter(z_dirs["model"])
    sde = SamplerSettings(kind="sde", steps=3, guidance_scale=2.5, noise_level=0.7, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, sde, seed=3, indices=[0, 1])
    assert_steps_rescore_exactly(adapter, sde, trajectory, conditioning(adapter, [""], RESOLUTION))


def test_a_lora_loads_with_load_lora_weights_and_generates_the_in_adapter_image(z_dirs, tmp_path):
    adapter = _adapter(z_dirs["model"])
    add_perturbed_lora(adapter, Z_IMAGE_LORA_TARGETS)  # a LoRA that changes the output
    save_lora(adapter.denoiser, tmp_path, pipeline_cls=ZImagePipeline, component="transformer")
    ode = SamplerSettings(kind="ode", steps=3, guidance_scale=1.0, noise_level=0.0, resolution=RESOLUTION)
    trajectory = rollout(adapter, PROMPTS, ode, seed=5, indices=[0, 1])
    pipe = _pipeline(z_dirs["model"])
    plain = _pipeline_images(pipe, trajectory.latents[:, 0], steps=3, guidance_scale=0.0)
    pipe.load_lora_weights(str(tmp_path))
    loaded = _pipeline_images(pipe, trajectory.latents[:, 0], steps=3, guidance_scale=0.0)
    assert (loaded - trajectory.images).abs().max().item() <= 1e-4
    assert (plain - trajectory.images).abs().max().item() > 1e-3  # the LoRA mattered
    targeted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if "lora_A" in n}
    for block in ("noise_refiner.0", "context_refiner.0", "layers.1"):
        assert any(f"{block}.attention.to_out.0" in n for n in targeted), block


def test_diffusion_dpo_starts_at_ln_2(z_dirs, tmp_path):
    cfg = tiny_lora_config(str(z_dirs["model"]), str(z_dirs["pairs"]), tmp_path / "dpo", resolution=32, max_steps=2)
    cfg.loss.name, cfg.loss.beta = "dpo", 100.0
    cfg.model.max_sequence_length = SEQ
    train(cfg)
    records = read_metrics(tmp_path / "dpo")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert records[1]["loss"] != pytest.approx(math.log(2), abs=1e-7)


def test_grpo_runs_on_z_image(z_dirs, tmp_path):
    out = tmp_path / "grpo"
    path = tmp_path / "grpo.yaml"
    path.write_text("{}\n")
    overrides = [
        f"model.pretrained={z_dirs['model']}",
        f"model.max_sequence_length={SEQ}",
        f"data.path={z_dirs['prompts']}",
        f"data.resolution={RESOLUTION}",
        "optim.lr=1e-3",
        f"train.output_dir={out}",
        "train.method=grpo",
        "train.max_steps=2",
        "train.train_batch_size=2",
        "train.checkpointing_steps=2",
        "train.progress_bar=false",
        f"online.reward_functions=[{REWARD}]",
        "online.sample_steps=3",
        "online.guidance_scale=2.0",
        "online.num_generations=2",
        "online.prompts_per_rollout=2",
        "online.timestep_fraction=0.67",
    ]
    train(load_config(path, overrides))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
