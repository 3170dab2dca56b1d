"""Each reference strategy (:mod:`diffalign.trainers.reference`) gives the numbers it stands for: adapters disabled ==
the base model, a frozen copy == the initial weights after the policy moved, the offloaded copy == the frozen copy,
precomputed lookups == the live values of the same (epoch, index); ``build_reference`` maps ``train.reference`` to
them and refuses what cannot work. Bit for bit throughout: every pair compared runs the same computation."""

from __future__ import annotations

import copy

import pytest
import torch

from diffalign.config import Config
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.models.diffusion import SDAdapter
from diffalign.models.lora import add_lora
from diffalign.models.tiny import save_tiny_sd_pipeline, tiny_sd_components
from diffalign.trainers.offline import OfflinePreferenceTrainer
from diffalign.trainers.reference import (
    AdaptersDisabled,
    FrozenCopy,
    OffloadedCopy,
    PrecomputedReference,
    build_reference,
)
from diffalign.trainers.reference_store import MissingReferenceError, OffloadedReference, plan_micro_batches


def pixel_adapter(seed: int = 0) -> SDAdapter:
    c = tiny_sd_components(with_vae=False, seed=seed, tokenizer_max_length=8)
    return SDAdapter(c["unet"], c["scheduler"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"])


def pair_forward(adapter: SDAdapter):
    """The trainer's reference forward (``OfflinePreferenceTrainer._reference_forward``) on a fixed batch of 2."""
    shape = adapter.latent_shape(16, 16)
    g = torch.Generator().manual_seed(0)
    x0_w, x0_l = torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g)
    noise = adapter.sample_noise(shape, 0, 0, range(2))
    t = torch.tensor([100, 700])
    cond = adapter.encode_prompts(["a red circle", "a blue square"])
    return lambda module: adapter.with_denoiser(module).pair_logps(x0_w, x0_l, cond, None, noise, t)


def perturb_(module: torch.nn.Module, *, only_trainable: bool = False) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad or not only_trainable:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def assert_equal_pairs(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b), (a, b)


BATCH = {"index": torch.tensor([3, 5])}  # live modes ignore the batch: the forward carries its inputs


def test_adapters_disabled_equals_the_base_model():
    adapter = pixel_adapter()
    forward = pair_forward(adapter)
    base = copy.deepcopy(adapter.denoiser)
    add_lora(adapter.denoiser, rank=4, init="gaussian")
    perturb_(adapter.denoiser, only_trainable=True)
    reference = AdaptersDisabled(adapter.denoiser)
    got = reference.logps(BATCH, 0, forward)
    with torch.no_grad():
        assert_equal_pairs(got, forward(base))
        policy = forward(adapter.denoiser)  # outside the strategy the adapters are on again
    assert not torch.equal(policy[0], got[0])
    assert not got[0].requires_grad
    with reference.network() as module:
        assert module is adapter.denoiser


def test_frozen_copy_keeps_the_initial_weights_after_the_policy_moves():
    adapter = pixel_adapter()
    forward = pair_forward(adapter)
    initial = pixel_adapter().denoiser  # the same weights, built independently
    policy = adapter.denoiser.requires_grad_(True).train()
    reference = FrozenCopy.of(policy, "cpu")
    perturb_(policy)
    with torch.no_grad():
        assert_equal_pairs(reference.logps(BATCH, 0, forward), forward(initial))
        assert not torch.equal(forward(policy)[0], forward(initial)[0])
    assert not reference.module.training and not any(p.requires_grad for p in reference.module.parameters())
    assert FrozenCopy.of(policy, "cpu", torch.float64).module.dtype == torch.float64


def test_offloaded_copy_equals_the_frozen_copy():
    adapter = pixel_adapter()
    forward = pair_forward(adapter)
    policy = adapter.denoiser
    frozen, offloaded = FrozenCopy.of(policy, "cpu"), OffloadedCopy.of(policy, "cpu")
    perturb_(policy)
    assert isinstance(offloaded.module, OffloadedReference) and offloaded.mode == "frozen_copy_offload"
    assert {p.device.type for p in offloaded.module.module.parameters()} == {"meta"}  # weights in the offload map
    assert_equal_pairs(offloaded.logps(BATCH, 0, forward), frozen.logps(BATCH, 0, forward))
    assert offloaded.describe() == "frozen copy in CPU memory, streamed to cpu per forward"


def test_precomputed_computes_from_the_source_once_then_serves_the_stored_values():
    adapter = pixel_adapter()
    forward = pair_forward(adapter)
    policy = adapter.denoiser.train()
    live = FrozenCopy.of(policy, "cpu")
    reference = PrecomputedReference(FrozenCopy(policy))  # what build_reference makes for a full fine-tune
    stored = reference.compute(forward)
    assert policy.training  # the pass ran in eval mode, as the frozen copy does, and restored the mode
    assert_equal_pairs(stored, live.logps(BATCH, 0, forward))
    table = {(0, 3): stored[0][0], (0, 5): stored[0][1]}
    reference.load(lambda batch, epoch: torch.stack([table[epoch, int(i)] for i in batch["index"]]), "a table")
    perturb_(policy)
    assert torch.equal(reference.logps(BATCH, 0, forward), stored[0])  # the policy moved, the values did not
    with pytest.raises(MissingReferenceError, match="only be computed before training starts"):
        reference.compute(forward)
    with pytest.raises(RuntimeError, match="holds no reference network"):
        reference.network()
    assert not reference.live and reference.describe() == "precomputed (a table)"


def test_build_reference_maps_every_mode():
    policy = pixel_adapter().denoiser
    lora_policy = pixel_adapter().denoiser
    add_lora(lora_policy, rank=4)
    modes = {
        ("auto", True): "adapters_disabled",
        ("auto", False): "frozen_copy",
        ("frozen_copy", False): "frozen_copy",
        ("frozen_copy_offload", False): "frozen_copy_offload",
        ("precomputed", True): "precomputed",
        ("precomputed", False): "precomputed",
    }
    for (mode, lora), expected in modes.items():
        built = build_reference(mode, lora_policy if lora else policy, lora=lora, device="cpu")
        assert built.mode == expected, (mode, lora)
    with pytest.raises(ValueError, match="train.reference: 'precomputed' stores values of a fixed data set"):
        build_reference("precomputed", policy, lora=False, device="cpu", stored_values=False)
    with pytest.raises(ValueError, match="train.reference: 'cached' is not one of"):
        build_reference("cached", policy, lora=False, device="cpu")


def test_trainer_lookup_equals_the_live_frozen_copy_for_the_same_epoch_and_index(tmp_path):
    model = save_tiny_sd_pipeline(tmp_path / "model", with_vae=False, sample_size=16)
    write_pickapic_parquet(tmp_path / "pairs.parquet", make_random_pairs(8, size=16, seed=0))
    cfg = Config()
    cfg.model.pretrained, cfg.data.path, cfg.data.resolution = str(model), str(tmp_path / "pairs.parquet"), 16
    cfg.data.proportion_empty_prompts = 0.5
    cfg.lora.enabled = False
    cfg.train.output_dir, cfg.train.reference, cfg.train.progress_bar = str(tmp_path / "out"), "precomputed", False
    cfg.train.train_batch_size, cfg.train.max_steps = 2, 5  # 4 micro-batches per epoch: into epoch 1
    trainer = OfflinePreferenceTrainer(cfg)
    trainer.build()
    live = FrozenCopy.of(trainer.model, "cpu")
    trainer.after_prepare()  # the pass, on the initial weights
    perturb_(trainer.model)  # then the policy moves
    for epoch, indices in plan_micro_batches(8, 2, num_processes=1, seed=0, num_micro_batches=5):
        trainer.dataset.set_epoch(epoch)
        batch = trainer.collate([trainer.dataset[i] for i in indices])
        forward = trainer._reference_forward(trainer._pair_inputs(batch, epoch))
        assert_equal_pairs(trainer.reference.logps(batch, epoch, forward), live.logps(batch, epoch, forward))
