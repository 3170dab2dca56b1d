"""SDAdapter and load_sd_adapter against independent oracles (diffusers' scheduler, closed forms, hand forwards)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from diffalign.models.diffusion import SDAdapter
from diffalign.models.loading import load_sd_adapter
from diffalign.models.tiny import tiny_sd_components
from diffalign.utils.randomness import NOISE, TIMESTEP, sample_generator


def make_adapter(**kwargs) -> tuple[SDAdapter, dict]:
    c = tiny_sd_components(**kwargs)
    adapter = SDAdapter(
        c["unet"], c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"]
    )
    return adapter, c


@pytest.fixture(scope="module")
def eps() -> tuple[SDAdapter, dict]:
    return make_adapter(prediction_type="epsilon", with_vae=True, seed=0)


@pytest.fixture(scope="module")
def vpred() -> tuple[SDAdapter, dict]:
    return make_adapter(prediction_type="v_prediction", with_vae=True, seed=1)


@pytest.fixture(scope="module")
def pixel() -> tuple[SDAdapter, dict]:
    return make_adapter(prediction_type="epsilon", with_vae=False, seed=2)


def sd_alphas_cumprod_float64() -> np.ndarray:
    """ᾱ_t of SD's scaled-linear schedule, from the formula: β = linspace(√0.00085, √0.012, 1000)², ᾱ = Π(1 − β)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def random_inputs(shape=(5, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    timesteps = torch.tensor([0, 1, 499, 998, 999][: shape[0]])
    return x0, noise, timesteps


# ----- noising and targets -----


@pytest.mark.parametrize("name", ["eps", "vpred"])
def test_add_noise_matches_ddpm_scheduler_and_closed_form(name, request):
    adapter, c = request.getfixturevalue(name)
    x0, noise, t = random_inputs()
    reference = DDPMScheduler.from_config(c["scheduler"].config)
    x_t = adapter.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, reference.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    a = torch.from_numpy(sd_alphas_cumprod_float64()[t.numpy()]).view(-1, 1, 1, 1)
    closed = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    torch.testing.assert_close(x_t.double(), closed, rtol=0, atol=1e-5)
    # t = 999: almost pure noise, sqrt(ᾱ_999) ≈ 0.0683 for SD's schedule
    assert float(a[-1].sqrt()) == pytest.approx(0.068265, abs=1e-5)


def test_targets_epsilon_and_velocity(eps, vpred):
    x0, noise, t = random_inputs()
    assert torch.equal(eps[0].target(x0, noise, t), noise)
    adapter, c = vpred
    v = adapter.target(x0, noise, t)
    torch.testing.assert_close(v, DDPMScheduler.from_config(c["scheduler"].config).get_velocity(x0, noise, t))
    a = torch.from_numpy(sd_alphas_cumprod_float64()[t.numpy()]).view(-1, 1, 1, 1)
    closed = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    torch.testing.assert_close(v.double(), closed, rtol=0, atol=1e-5)
    # at t = 0 (ᾱ ≈ 0.99915) v is nearly ε; at t = 999 nearly −x0
    assert float((v[0] - noise[0]).abs().max()) < 0.15
    assert float((v[-1] + x0[-1]).abs().max()) < 0.3


def test_snr_weights_closed_form(eps, vpred):
    t = torch.tensor([0, 10, 200, 500, 999])
    snr = sd_alphas_cumprod_float64()[t.numpy()] / (1 - sd_alphas_cumprod_float64()[t.numpy()])
    gamma = 5.0
    expected_eps = np.minimum(snr, gamma) / snr
    expected_v = np.minimum(snr, gamma) / (snr + 1)
    np.testing.assert_allclose(eps[0].snr_weights(t, gamma).numpy(), expected_eps, rtol=1e-4)
    np.testing.assert_allclose(vpred[0].snr_weights(t, gamma).numpy(), expected_v, rtol=1e-4)
    assert float(eps[0].snr_weights(t, gamma)[-1]) == 1.0  # low SNR: full weight
    assert float(eps[0].snr_weights(t, gamma)[0]) < 0.01  # t = 0: SNR ≈ 1200, weight 5 / SNR
    # truncated SNR (γ = 1): the x0-space error weighted by max(SNR, 1), i.e. ε-space weight max(SNR, 1) / SNR
    truncated = eps[0].snr_weights(t, 1.0, "truncated_snr").numpy()
    np.testing.assert_allclose(truncated, np.maximum(snr, 1.0) / snr, rtol=1e-4)
    assert truncated[0] == 1.0 and truncated[-1] > 100  # t = 999: SNR ≈ 0.0047
    np.testing.assert_allclose(
        vpred[0].snr_weights(t, 1.0, "truncated_snr").numpy(), np.maximum(snr, 1.0) / (snr + 1), rtol=1e-4
    )
    with pytest.raises(ValueError, match="snr_gamma"):
        eps[0].snr_weights(t, 0.0)
    with pytest.raises(ValueError, match="weighting"):
        eps[0].snr_weights(t, 1.0, "p2")


def test_prediction_type_override_and_rejections():
    c = tiny_sd_components(with_vae=False)
    adapter = SDAdapter(c["unet"], c["scheduler"], prediction_type="v_prediction")
    assert adapter.prediction_type == "v_prediction"
    assert c["scheduler"].config.prediction_type == "epsilon"  # the caller's scheduler is left alone
    with pytest.raises(NotImplementedError, match="sample"):
        SDAdapter(c["unet"], c["scheduler"], prediction_type="sample")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        SDAdapter(c["unet"], c["scheduler"], prediction_type="flow")


# ----- prompts and images -----


def test_encode_prompts_is_last_hidden_state_of_padded_ids(eps):
    adapter, c = eps
    prompts = ["a red circle", "a blue square on a dark background"]
    ids = c["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids[0, 0] == 49406 and ids[0, -1] == 49407  # <|startoftext|> ... padded with <|endoftext|>
    with torch.no_grad():
        expected = c["text_encoder"](ids)[0]
    out = adapter.encode_prompts(prompts)["encoder_hidden_states"]
    assert out.shape == (2, 77, 32) and not out.requires_grad
    assert torch.equal(out, expected)
    with pytest.raises(TypeError, match="list of str"):
        adapter.encode_prompts("a red circle")


def test_encode_images_mean_sample_and_pixel_identity(eps, pixel):
    adapter, c = eps
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior = c["vae"].encode(pixels).latent_dist
    mean = adapter.encode_images(pixels)
    assert mean.shape == (2, 4, 8, 8) == (2, *adapter.latent_shape(16, 16))
    torch.testing.assert_close(mean, posterior.mean * 0.18215, rtol=0, atol=0)
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    sampled = adapter.encode_images(pixels, gens)
    eps_draws = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (10, 11)])
    torch.testing.assert_close(sampled, (posterior.mean + posterior.std * eps_draws) * 0.18215)
    # per-image generators make each row independent of what else is in the batch
    alone = adapter.encode_images(pixels[1:], [torch.Generator().manual_seed(11)])
    torch.testing.assert_close(alone[0], sampled[1])
    assert pixel[0].encode_images(pixels) is pixels and pixel[0].latent_shape(16, 16) == (3, 16, 16)


# ----- MSE and paired forwards -----


def hand_mse(c, x0, noise, t, ehs):
    x_t = DDPMScheduler.from_config(c["scheduler"].config).add_noise(x0, noise, t)
    target = noise if c["scheduler"].config.prediction_type == "epsilon" else c["scheduler"].get_velocity(x0, noise, t)
    unet = c["unet"]
    with torch.no_grad():
        pred = unet(x_t.to(unet.dtype), t, ehs.to(unet.dtype)).sample
    return ((pred.float() - target.float()) ** 2).mean((1, 2, 3))


@pytest.mark.parametrize("name", ["eps", "vpred", "pixel"])
def test_per_sample_mse_equals_hand_computation(name, request):
    adapter, c = request.getfixturevalue(name)
    shape = (3, 3, 16, 16) if c["vae"] is None else (3, 4, 8, 8)
    x0, noise, t = random_inputs(shape)
    cond = adapter.encode_prompts(["a red circle", "a green triangle", ""])
    mse = adapter.per_sample_mse(x0, noise, t, cond)
    assert mse.shape == (3,) and mse.dtype == torch.float32 and mse.requires_grad
    expected = hand_mse(c, x0, noise, t, cond["encoder_hidden_states"])
    torch.testing.assert_close(mse.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.denoising_logp(x0, noise, t, cond).detach(), -0.5 * expected)


def test_mse_is_float32_for_a_bfloat16_unet():
    adapter, c = make_adapter(with_vae=False, seed=4)
    c["unet"].to(torch.bfloat16)
    x0, noise, t = random_inputs((2, 3, 16, 16))
    cond = adapter.encode_prompts(["a red circle", "a blue circle"])
    mse = adapter.per_sample_mse(x0, noise, t, cond)
    assert mse.dtype == torch.float32
    # the input is rounded to bf16 in both paths; the difference to the target is taken in fp32
    torch.testing.assert_close(mse.detach(), hand_mse(c, x0, noise, t, cond["encoder_hidden_states"]))


def test_pair_logps_one_forward_shared_noise_and_timestep(eps):
    adapter, c = eps
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].detach().clone(), args[1].clone(), kwargs["encoder_hidden_states"].clone()))

    handle = c["unet"].register_forward_hook(hook, with_kwargs=True)
    try:
        g = torch.Generator().manual_seed(7)
        x0_w, x0_l = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        noise = adapter.sample_noise((4, 8, 8), seed=1, epoch=0, indices=[0, 1, 2])
        t = adapter.sample_timesteps(seed=1, epoch=0, indices=[0, 1, 2])
        cond_w = adapter.encode_prompts(["a red circle", "a blue square", "a green triangle"])
        cond_l = adapter.encode_prompts(["a blue circle", "a red square", "a yellow triangle"])
        logp_w, logp_l = adapter.pair_logps(x0_w, x0_l, cond_w, cond_l, noise, t)
        assert len(calls) == 1
        x_t, t_seen, ehs_seen = calls[0]
        assert x_t.shape[0] == 6 and torch.equal(t_seen, torch.cat([t, t]))
        assert torch.equal(ehs_seen, torch.cat([cond_w["encoder_hidden_states"], cond_l["encoder_hidden_states"]]))
        # remove each half's signal: what is left, sqrt(1 − ᾱ)·ε, must be the same for winner and loser
        a = adapter.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t[:3] - a.sqrt() * x0_w, x_t[3:] - a.sqrt() * x0_l, rtol=0, atol=1e-6)
        torch.testing.assert_close(x_t[:3] - a.sqrt() * x0_w, (1 - a).sqrt() * noise, rtol=0, atol=1e-6)
        calls.clear()
        separate_w = adapter.denoising_logp(x0_w, noise, t, cond_w)
        separate_l = adapter.denoising_logp(x0_l, noise, t, cond_l)
        assert len(calls) == 2
    finally:
        handle.remove()
    torch.testing.assert_close(logp_w, separate_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logp_l, separate_l, rtol=1e-5, atol=1e-7)
    # cond_rejected=None: the losers are conditioned on the winners' prompts
    same_w, same_l = adapter.pair_logps(x0_w, x0_l, cond_w, None, noise, t)
    torch.testing.assert_close(same_l, adapter.denoising_logp(x0_l, noise, t, cond_w), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="shared by the pair"):
        adapter.pair_logps(x0_w, x0_l, cond_w, cond_l, torch.cat([noise, noise]), t)


def test_timesteps_and_noise_are_addressable_and_batch_independent(eps):
    adapter, _ = eps
    t_all = adapter.sample_timesteps(5, 2, list(range(8)))
    t_split = torch.cat([adapter.sample_timesteps(5, 2, [0, 1, 2, 3]), adapter.sample_timesteps(5, 2, [4, 5, 6, 7])])
    assert t_all.dtype == torch.int64 and torch.equal(t_all, t_split)
    assert int(t_all.min()) >= 0 and int(t_all.max()) <= 999
    assert not torch.equal(t_all, adapter.sample_timesteps(5, 3, list(range(8))))  # another epoch, other draws
    expected_t = [int(torch.randint(1000, (), generator=sample_generator(5, 2, i, TIMESTEP))) for i in range(8)]
    assert t_all.tolist() == expected_t
    n_all = adapter.sample_noise((4, 8, 8), 5, 2, list(range(8)))
    n_split = torch.cat(
        [adapter.sample_noise((4, 8, 8), 5, 2, [0, 1, 2, 3]), adapter.sample_noise((4, 8, 8), 5, 2, [4, 5, 6, 7])]
    )
    assert n_all.shape == (8, 4, 8, 8) and n_all.dtype == torch.float32 and torch.equal(n_all, n_split)
    assert torch.equal(n_all[6], torch.randn(4, 8, 8, generator=sample_generator(5, 2, 6, NOISE)))
    # a larger draw: uniform on {0..999} has mean 499.5, sd 288.7 -> the mean of 400 lies within ±45 w.p. > 0.999
    many = adapter.sample_timesteps(0, 0, list(range(400))).float()
    assert abs(float(many.mean()) - 499.5) < 45


# ----- loading -----


@pytest.mark.parametrize("name", ["eps", "v", "pixel"])
def test_load_sd_adapter_reproduces_the_saved_components(name, tiny_sd_dirs, tiny_sd_variants):
    kwargs = tiny_sd_variants[name]
    loaded = load_sd_adapter(tiny_sd_dirs[name])
    original, c = make_adapter(**kwargs)
    assert loaded.prediction_type == kwargs["prediction_type"]
    assert (loaded.vae is None) == (not kwargs["with_vae"])
    assert loaded.num_train_timesteps == 1000 and loaded.tokenizer.model_max_length == 77
    torch.testing.assert_close(loaded.scheduler.alphas_cumprod, c["scheduler"].alphas_cumprod, rtol=0, atol=0)
    prompts = ["a red circle", "a yellow square"]
    cond = loaded.encode_prompts(prompts)
    assert torch.equal(cond["encoder_hidden_states"], original.encode_prompts(prompts)["encoder_hidden_states"])
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = loaded.encode_images(pixels)
    assert torch.equal(x0, original.encode_images(pixels))
    noise, t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    assert torch.equal(loaded.per_sample_mse(x0, noise, t, cond), original.per_sample_mse(x0, noise, t, cond))


def test_tiny_folder_loads_in_stable_diffusion_pipeline(tiny_sd_dirs):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dirs["eps"], safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_load_prediction_type_override(tiny_sd_dirs):
    adapter = load_sd_adapter(tiny_sd_dirs["eps"], prediction_type="v_prediction")
    assert adapter.prediction_type == "v_prediction"
    x0, noise, t = random_inputs()
    torch.testing.assert_close(adapter.target(x0, noise, t), adapter.scheduler.get_velocity(x0, noise, t))


def test_load_errors_name_the_path(tmp_path, tiny_sd_dirs):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_sd_adapter(missing)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dirs["pixel"], broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match=r"broken.*\['unet'\]"):
        load_sd_adapter(broken)
    no_vae = tmp_path / "no_vae"
    shutil.copytree(tiny_sd_dirs["eps"], no_vae)
    shutil.rmtree(no_vae / "vae")
    assert json.loads((no_vae / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    with pytest.raises(FileNotFoundError, match="names a VAE"):
        load_sd_adapter(no_vae)


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch, tiny_sd_dirs):
    from diffalign.models import loading

    assert loading.resolve_pretrained("stabilityai/stable-diffusion-2-1") == ("stabilityai/stable-diffusion-2-1", False)
    assert loading.resolve_pretrained(tiny_sd_dirs["eps"]) == (str(tiny_sd_dirs["eps"]), True)
    for path_like in ("./models/sd15", "runs/a/b", str(tmp_path / "x")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            loading.resolve_pretrained(path_like)
    # for a hub id, model_index.json decides between latent and pixel space (no download in this test)
    calls = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False):
        calls.append((repo_id, filename, revision, local_files_only))
        return str(tiny_sd_dirs["pixel" if repo_id == "me/pixel" else "eps"] / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    assert loading._hub_has_vae("me/latent", "main", True) is True
    assert loading._hub_has_vae("me/pixel", None, False) is False
    assert calls[0] == ("me/latent", "model_index.json", "main", True)


def test_tiny_vae_levels_set_the_latent_size() -> None:
    parts = tiny_sd_components(sample_size=32, vae_block_out_channels=(32, 64, 64, 64))  # SD's factor 8
    latents = parts["vae"].encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 4, 4) and parts["unet"].config.sample_size == 4
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 8"):
        tiny_sd_components(sample_size=36, vae_block_out_channels=(32, 64, 64, 64))
