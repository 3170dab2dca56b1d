"""LoRA attach/save/load and the reference model through its strategies (:mod:`diffalign.trainers.reference`:
adapters disabled, or a frozen full copy), evaluated by the adapter (``adapter.with_denoiser(module)``)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffalign.models.diffusion import SDAdapter
from diffalign.models.loading import load_sd_adapter
from diffalign.models.lora import add_lora, load_lora_into_unet, save_lora
from diffalign.models.reference import adapters_disabled
from diffalign.models.tiny import tiny_sd_components
from diffalign.trainers.reference import AdaptersDisabled, FrozenCopy

BATCH = {"index": torch.tensor([0, 1])}  # live references ignore the batch: the forward carries its inputs


def pixel_adapter(seed: int = 0) -> tuple[SDAdapter, dict]:
    c = tiny_sd_components(with_vae=False, seed=seed, tokenizer_max_length=8)
    return SDAdapter(c["unet"], c["scheduler"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"]), c


def fixed_batch(adapter: SDAdapter, batch: int = 2):
    shape = adapter.latent_shape(16, 16)
    g = torch.Generator().manual_seed(0)
    x0_w, x0_l = torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)
    noise = adapter.sample_noise(shape, 0, 0, range(batch))
    t = torch.tensor([100, 700, 400, 50][:batch])
    cond = adapter.encode_prompts(["a red circle", "a blue square", "a green circle", ""][:batch])
    return x0_w, x0_l, noise, t, cond


def pair_forward(adapter: SDAdapter, x0_w, x0_l, noise, t, cond):
    """How a trainer evaluates a reference network on the pair (``OfflinePreferenceTrainer._reference_forward``)."""
    return lambda module: adapter.with_denoiser(module).pair_logps(x0_w, x0_l, cond, None, noise, t)


def perturb_(params: list[torch.nn.Parameter], seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_add_lora_starts_at_the_base_and_reference_equals_policy():
    adapter, c = pixel_adapter()
    x0_w, x0_l, noise, t, cond = fixed_batch(adapter)
    base_w, base_l = adapter.pair_logps(x0_w, x0_l, cond, None, noise, t)
    params = add_lora(c["unet"], rank=4)
    # 6 transformer blocks (2 down, 1 mid, 3 up) × 2 attentions × 4 projections × (A, B)
    assert len(params) == 6 * 2 * 4 * 2
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    trainable = {id(p) for p in c["unet"].parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    policy = adapter.pair_logps(x0_w, x0_l, cond, None, noise, t)
    reference = AdaptersDisabled(c["unet"]).logps(BATCH, 0, pair_forward(adapter, x0_w, x0_l, noise, t, cond))
    for got, ref, base in zip(policy, reference, (base_w, base_l), strict=True):
        assert torch.equal(got.detach(), ref) and torch.equal(ref, base.detach())
        assert not ref.requires_grad


def test_adapters_disabled_reference_is_the_base_and_restores_the_lora():
    adapter, c = pixel_adapter(seed=1)
    base = copy.deepcopy(c["unet"])
    params = add_lora(c["unet"], rank=4, alpha=8)
    perturb_(params)
    x0_w, _, noise, t, cond = fixed_batch(adapter)
    x_t = adapter.add_noise(x0_w, noise, t)
    ehs = cond["encoder_hidden_states"]
    with torch.no_grad():
        base_out = base(x_t, t, ehs).sample
    policy_before = adapter.predict(x_t, t, cond)
    assert policy_before.requires_grad and (policy_before - base_out).abs().max() > 1e-3
    strategy = AdaptersDisabled(c["unet"])

    def predict(module: torch.nn.Module) -> torch.Tensor:
        return adapter.with_denoiser(module).predict(x_t, t, cond)

    reference = strategy.logps(BATCH, 0, predict)
    assert torch.equal(reference, base_out) and not reference.requires_grad
    with strategy.network() as module:
        assert module is c["unet"]
        assert torch.equal(predict(module).detach(), base_out)
        with strategy.network() as inner:  # nesting keeps the reference
            assert torch.equal(predict(inner).detach(), base_out)
        assert torch.equal(predict(module).detach(), base_out)
    assert torch.equal(adapter.predict(x_t, t, cond).detach(), policy_before.detach())
    assert all(p.requires_grad for p in params)
    # a frozen adapter stays frozen after the context (peft's re-enable alone would unfreeze it)
    for p in params:
        p.requires_grad_(False)
    strategy.logps(BATCH, 0, predict)
    assert not any(p.requires_grad for p in params)


def test_frozen_full_copy_reference_keeps_the_initial_weights():
    adapter, c = pixel_adapter(seed=2)
    x0_w, x0_l, noise, t, cond = fixed_batch(adapter)
    forward = pair_forward(adapter, x0_w, x0_l, noise, t, cond)
    with pytest.raises(RuntimeError, match="no peft adapters"):  # without LoRA, disabling adapters is no reference
        AdaptersDisabled(c["unet"]).logps(BATCH, 0, forward)
    original = adapter.pair_logps(x0_w, x0_l, cond, None, noise, t)
    strategy = FrozenCopy.of(c["unet"], "cpu")
    reference_unet = strategy.module
    assert reference_unet is not c["unet"] and not any(p.requires_grad for p in reference_unet.parameters())
    assert not reference_unet.training
    perturb_(list(c["unet"].parameters()), scale=0.01)  # a full fine-tuning step, in effect
    policy = adapter.pair_logps(x0_w, x0_l, cond, None, noise, t)
    reference = strategy.logps(BATCH, 0, forward)
    for pol, ref, orig in zip(policy, reference, original, strict=True):
        assert torch.equal(ref, orig.detach()) and not ref.requires_grad
        assert (pol.detach() - ref).abs().max() > 1e-6
    loss = -(policy[0] - policy[1]).sum()
    loss.backward()
    assert c["unet"].conv_in.weight.grad is not None and reference_unet.conv_in.weight.grad is None


def test_saved_lora_loads_in_stable_diffusion_pipeline(tmp_path, tiny_sd_dirs):
    adapter = load_sd_adapter(tiny_sd_dirs["eps"])
    params = add_lora(adapter.denoiser, rank=4, alpha=2)
    perturb_(params, seed=3)
    path = save_lora(adapter.denoiser, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dirs["eps"], safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    g = torch.Generator().manual_seed(5)
    x_t, ehs, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([3, 800])
    with torch.no_grad():
        ours = adapter.denoiser(x_t, t, ehs).sample
        theirs = pipe.unet(x_t, t, ehs).sample
        with adapters_disabled(adapter.denoiser):
            base = adapter.denoiser(x_t, t, ehs).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters, so equality below is informative
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_load_lora_into_unet_resumes_the_adapter(tmp_path):
    adapter, c = pixel_adapter(seed=3)
    params = add_lora(c["unet"], rank=2)
    perturb_(params, seed=4)
    save_lora(c["unet"], tmp_path)
    fresh = tiny_sd_components(with_vae=False, seed=3, tokenizer_max_length=8)["unet"]
    fresh_params = add_lora(fresh, rank=2)
    x_t, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)), torch.tensor([5, 600])
    ehs = adapter.encode_prompts(["a red circle", "a blue circle"])["encoder_hidden_states"]
    with torch.no_grad():
        assert not torch.equal(fresh(x_t, t, ehs).sample, c["unet"](x_t, t, ehs).sample)
        load_lora_into_unet(fresh, tmp_path)
        assert torch.equal(fresh(x_t, t, ehs).sample, c["unet"](x_t, t, ehs).sample)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in fresh_params)
    mismatched = tiny_sd_components(with_vae=False, seed=3, tokenizer_max_length=8)["unet"]
    add_lora(mismatched, rank=2, target_modules=("to_q", "to_v"))
    with pytest.raises(ValueError, match="do not match"):
        load_lora_into_unet(mismatched, tmp_path)


def test_lora_params_stay_float32_on_a_half_precision_base():
    unet = tiny_sd_components(with_vae=False, tokenizer_max_length=8)["unet"].to(torch.float16)
    params = add_lora(unet, rank=4)
    assert all(p.dtype == torch.float32 for p in params)
    assert unet.conv_in.weight.dtype == torch.float16 and not unet.conv_in.weight.requires_grad
