"""SDXL and SD3 adapters against diffusers' own code: conditioning equals the pipelines' ``encode_prompt``, noising
and targets equal the schedulers', SDXL time ids follow both conventions, and saved tiny pipelines load back through
the same ``load_adapter`` path a hub id takes."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from helpers_adapters import sd3_adapter, sdxl_adapter
from helpers_losses import pair_loss
from PIL import Image

from diffalign.data.synthetic import encode_png, write_pickapic_parquet
from diffalign.data.transforms import PreferencePairDataset, collate_preference_batch
from diffalign.losses import get_loss
from diffalign.models.diffusion import SDAdapter
from diffalign.models.loading import detect_backbone, load_adapter
from diffalign.models.lora import add_lora
from diffalign.models.sd3 import SD3Adapter
from diffalign.models.sdxl import SDXLAdapter
from diffalign.models.tiny import save_tiny_sd_pipeline
from diffalign.models.tiny_sd3 import SD3_LORA_TARGETS, save_tiny_sd3_pipeline, tiny_sd3_components
from diffalign.models.tiny_sdxl import save_tiny_sdxl_pipeline, tiny_sdxl_components
from diffalign.trainers.reference import AdaptersDisabled

PROMPTS = ["a red circle", "a blue square on a grey background"]
BATCH = {"index": torch.tensor([0, 1])}  # live references ignore the batch: the forward carries its inputs


@pytest.fixture(scope="module")
def sdxl_components() -> dict:
    return tiny_sdxl_components()


@pytest.fixture(scope="module")
def sd3_components() -> dict:
    return tiny_sd3_components(with_t5=True)


# ----------------------------------------------------------------------------------------------------- SDXL


def test_sdxl_conditioning_equals_the_pipelines_encode_prompt(sdxl_components):
    adapter = sdxl_adapter(sdxl_components)
    ours = adapter.encode_prompts(PROMPTS)
    pipe = StableDiffusionXLPipeline(**sdxl_components)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)
    assert ours["encoder_hidden_states"].shape[-1] == 16 + 32  # both encoders' penultimate states, concatenated


def test_sdxl_constant_time_ids_are_the_original_scripts(sdxl_components):
    adapter = sdxl_adapter(sdxl_components, time_ids="constant")
    ids = adapter.batch_conditioning({"index": [0, 1, 2]}, 1024)["time_ids"]
    assert ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 3


def test_sdxl_time_ids_from_data_follow_diffusers(sdxl_components, tmp_path):
    """jpg_0's (h, w) before any resize, the crop offset of the jointly resized pair, then the target size."""
    rows = []
    rng = torch.Generator().manual_seed(0)
    for i, (size_0, size_1, label_0) in enumerate([((48, 32), (20, 20), 1.0), ((32, 64), (40, 40), 0.0)]):
        imgs = [
            Image.fromarray(torch.randint(0, 255, (s[1], s[0], 3), generator=rng).byte().numpy())
            for s in (size_0, size_1)
        ]
        rows.append(
            {
                "jpg_0": encode_png(imgs[0]),
                "jpg_1": encode_png(imgs[1]),
                "label_0": label_0,
                "label_1": 1 - label_0,
                "caption": f"prompt {i}",
            }
        )
    path = write_pickapic_parquet(tmp_path / "pairs.parquet", rows)
    from diffalign.data import load_preference_table

    table = load_preference_table(str(path))
    dataset = PreferencePairDataset(table, resolution=16, hflip=True, seed=0, joint=True)
    batch = collate_preference_batch([dataset[0], dataset[1]])
    # pair 0: jpg_0 is 48 wide x 32 high -> shorter side 16 gives 24 x 16, centre crop left = round(8 / 2) = 4
    # pair 1: jpg_0 (the loser, label_0 = 0) is 32 wide x 64 high -> 16 x 32, crop top = 8
    assert batch["original_size"].tolist() == [[32, 48], [64, 32]]
    assert batch["crop_top_left"].tolist() == [[0, 4], [8, 0]]
    ids = sdxl_adapter(sdxl_components, time_ids="from_data").batch_conditioning(batch, 16)["time_ids"]
    assert ids.tolist() == [[32, 48, 0, 4, 16, 16], [64, 32, 8, 0, 16, 16]]
    for i in range(2):  # one flip draw for the pair
        draws = dataset.draws(i)
        assert draws.flip_chosen == draws.flip_rejected


def test_sdxl_noising_and_v_target_equal_ddpm_scheduler(sdxl_components):
    adapter = sdxl_adapter(sdxl_components, prediction_type="v_prediction")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(adapter.add_noise(x0, noise, t), adapter.scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(adapter.target(x0, noise, t), adapter.scheduler.get_velocity(x0, noise, t))


def test_sdxl_adapter_refuses_an_sd_unet():
    from diffalign.models.tiny import tiny_sd_components

    c = tiny_sd_components()
    with pytest.raises(ValueError, match="text_time"):
        SDXLAdapter(c["unet"], c["scheduler"])


# ----------------------------------------------------------------------------------------------------- SD3


def test_sd3_conditioning_equals_the_pipelines_encode_prompt(sd3_components):
    for with_t5 in (True, False):
        components = dict(sd3_components)
        if not with_t5:
            components.update(text_encoder_3=None, tokenizer_3=None)
        adapter = sd3_adapter(components, max_sequence_length=12)
        ours = adapter.encode_prompts(PROMPTS)
        pipe = StableDiffusion3Pipeline(**components)
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=12
        )
        torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
        torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)
        assert embeds.shape == (2, 77 + 12, 64)
        if not with_t5:
            assert ours["encoder_hidden_states"][:, 77:].abs().max() == 0  # zeros stand in for T5


def test_sd3_noising_and_target_equal_flow_match_scheduler(sd3_components):
    adapter = sd3_adapter(sd3_components)
    indices = list(range(64))
    t = adapter.sample_timesteps(0, 0, indices)
    schedule = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert all(bool((schedule.timesteps == ti).any()) for ti in t)  # every draw lies on the shifted schedule
    x0, noise = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
    torch.testing.assert_close(adapter.add_noise(x0, noise, t), schedule.scale_noise(x0, t, noise), atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter.target(x0, noise, t), noise - x0)


def test_sd3_timesteps_are_logit_normal_on_the_shifted_schedule_and_addressable(sd3_components):
    adapter = sd3_adapter(sd3_components)
    t = adapter.sample_timesteps(0, 0, range(4000))
    # u = sigmoid(N(0, 1)); index = int(u * 1000); sigma = shift * s / (1 + (shift - 1) s) with s = 1 - index / 1000
    u = torch.sigmoid(torch.stack([torch.normal(0.0, 1.0, (1,), generator=g) for g in _generators(4000)]).squeeze(1))
    s = 1 - (u * 1000).long() / 1000
    expected = 3 * s / (1 + 2 * s) * 1000
    torch.testing.assert_close(t, expected.float(), atol=1e-3, rtol=0)
    assert 0.5 < (t / 1000).median() < 0.9  # the shift moves the mass toward high noise
    # a pair index gets the same timestep in any batch, so winner and loser share it
    assert adapter.sample_timesteps(0, 0, [7])[0] == t[7]
    assert adapter.sample_timesteps(0, 1, [7])[0] != t[7]


def _generators(n: int) -> list[torch.Generator]:
    from diffalign.utils.randomness import TIMESTEP, sample_generator

    return [sample_generator(0, 0, i, TIMESTEP) for i in range(n)]


def test_sd3_dpo_is_ln2_at_init_and_matches_the_hand_computed_loss(sd3_components):
    adapter = sd3_adapter(sd3_components)
    add_lora(adapter.denoiser, rank=4, target_modules=SD3_LORA_TARGETS)
    cond = adapter.encode_prompts(PROMPTS)
    x0_w, x0_l = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    noise = adapter.sample_noise((4, 16, 16), 0, 0, [0, 1])
    t = adapter.sample_timesteps(0, 0, [0, 1])
    dpo = get_loss("dpo")
    reference = AdaptersDisabled(adapter.denoiser)  # the trainers' LoRA reference
    pol = adapter.pair_logps(x0_w, x0_l, cond, None, noise, t)
    ref = reference.logps(BATCH, 0, lambda m: adapter.with_denoiser(m).pair_logps(x0_w, x0_l, cond, None, noise, t))
    out = pair_loss(dpo, pol, ref, beta=100.0)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)), atol=1e-7, rtol=0)
    with torch.no_grad():  # move the policy away from the reference
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    lw, ll = adapter.pair_mse(x0_w, x0_l, cond, None, noise, t)
    rw, rl = reference.logps(BATCH, 0, lambda m: adapter.with_denoiser(m).pair_mse(x0_w, x0_l, cond, None, noise, t))
    # by hand: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0, per-sample mean squared error
    sigma = (t / 1000).reshape(-1, 1, 1, 1)
    full_cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    with torch.no_grad():
        pred = adapter.denoiser(
            hidden_states=torch.cat([(1 - sigma) * x0_w + sigma * noise, (1 - sigma) * x0_l + sigma * noise]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=full_cond["encoder_hidden_states"],
            pooled_projections=full_cond["pooled_projections"],
        ).sample
    by_hand = (pred - torch.cat([noise - x0_w, noise - x0_l])).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(torch.cat([lw, ll]).detach(), by_hand, atol=1e-6, rtol=1e-5)
    logits = -(100.0 / 2) * ((lw - ll) - (rw - rl))
    out = dpo(
        policy_chosen_logps=-0.5 * lw,
        policy_rejected_logps=-0.5 * ll,
        reference_chosen_logps=-0.5 * rw,
        reference_rejected_logps=-0.5 * rl,
        beta=100.0,
    )
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(logits), atol=1e-6, rtol=1e-6)
    assert (out.losses - math.log(2)).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------- loading


def test_saved_tiny_pipelines_load_back_through_load_adapter(tmp_path):
    sd = save_tiny_sd_pipeline(tmp_path / "sd", sample_size=16)
    sdxl = save_tiny_sdxl_pipeline(tmp_path / "sdxl")
    sd3 = save_tiny_sd3_pipeline(tmp_path / "sd3", with_t5=True)
    sd3_pixels = save_tiny_sd3_pipeline(tmp_path / "sd3px", with_vae=False, sample_size=16)
    assert [detect_backbone(p) for p in (sd, sdxl, sd3, sd3_pixels)] == ["sd", "sdxl", "sd3", "sd3"]
    assert type(load_adapter(sd)) is SDAdapter
    xl = load_adapter(sdxl, sdxl_time_ids="from_data")
    assert isinstance(xl, SDXLAdapter) and xl.time_id_convention == "from_data"
    three = load_adapter(sd3, max_sequence_length=5)
    assert isinstance(three, SD3Adapter) and three.text_encoder_3 is not None and three.vae is not None
    assert three.encode_prompts(PROMPTS)["encoder_hidden_states"].shape == (2, 77 + 5, 64)
    assert load_adapter(sd3, load_t5=False).text_encoder_3 is None
    assert load_adapter(sd3_pixels).vae is None
    # the reloaded SDXL pipeline is the same model diffusers loads
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    torch.testing.assert_close(
        xl.encode_prompts(PROMPTS)["text_embeds"], pipe.encode_prompt(PROMPTS, device="cpu")[2], rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="only to SD3"):
        load_adapter(sdxl, load_t5=False)
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        import shutil

        shutil.rmtree(sdxl / "text_encoder_2")
        load_adapter(sdxl, backbone="sdxl")


def test_sd3_gradient_checkpointing_gives_the_same_loss_and_gradients(sd3_components):
    adapter = sd3_adapter(tiny_sd3_components(with_vae=False, sample_size=16))
    transformer = adapter.denoiser.train()
    cond = adapter.encode_prompts(PROMPTS)
    x0, noise = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t = adapter.sample_timesteps(0, 0, [0, 1])
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.zero_grad()
        mse = adapter.per_sample_mse(x0, noise, t, cond)
        mse.sum().backward()
        results.append((mse.detach(), [p.grad.clone() for p in transformer.parameters() if p.grad is not None]))
    assert transformer.is_gradient_checkpointing
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
