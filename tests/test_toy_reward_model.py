"""The toy rewards: the pixel gold reward and the learned, brightness-biased CLIP-style reward model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffalign.rewards.base import EmbeddingReward, RewardModel
from diffalign.toy.reward_model import (
    TOY_REWARD_CONFIG,
    ToyRewardModel,
    build_model,
    compose,
    coverage_pool,
    default_reward_model_path,
    ensure_toy_reward_model,
    measure_properties,
    read_info,
    spearman,
    train_reward_model,
)
from diffalign.toy.rewards import ToyGoldReward, load_toy_reward_model
from diffalign.toy.world import COLOURS, SHAPES, ShapeSpec, all_prompts, caption_for, render_batch, sample_specs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> ToyRewardModel:
    return load_toy_reward_model()


def test_committed_weights_are_current_and_small() -> None:
    folder = default_reward_model_path()
    assert ensure_toy_reward_model() == folder  # hash of the committed model matches the code's config
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000
    assert read_info(folder)["hash"] == TOY_REWARD_CONFIG.hash()


def test_protocol_consistency_and_gradient(model: ToyRewardModel) -> None:
    assert isinstance(model, EmbeddingReward) and isinstance(model, RewardModel) and model.differentiable
    images = render_batch(sample_specs(6, seed=5))
    prompts = [all_prompts()[i] for i in range(6)]
    reward = model(images, prompts)
    assert reward.shape == (6,) and reward.dtype == torch.float32
    img, txt = model.image_embeds(images), model.text_embeds(prompts)
    assert img.shape == txt.shape == (6, 32) and not txt.requires_grad
    torch.testing.assert_close(reward, model.score_embeds(img, txt))
    x = images.clone().requires_grad_(True)
    model(x, prompts).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # frozen: gradients reach the images only
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    assert model(big, prompts).shape == (6,)  # other resolutions are resized
    assert torch.isfinite(model(images[:1], ["a purple hexagon"])).all()  # unknown words share one row
    with pytest.raises(ValueError, match="one prompt per image"):
        model(images, prompts[:2])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(images[:, :1], prompts)


def test_measured_properties(model: ToyRewardModel) -> None:
    props = measure_properties(model)
    # 1. knows the content
    assert props["content_accuracy"] >= 0.85 and props["content_accuracy_wide"] >= 0.85
    # 2. has the bias, and it can be exploited
    assert props["brightness_spearman"] >= 0.5 and props["brightness_spearman_world"] >= 0.5
    assert props["brightness_spearman_fixed_content"] >= 0.5
    assert 0.05 <= props["exploit_fraction"] <= 0.6
    # 3. the gold reward is blind to brightness: 1 for every correct image, never prefers the exploit
    assert props["gold_correct_min"] == props["gold_correct_max"] == 1.0
    assert props["gold_exploit_fraction"] == 0.0
    recorded = read_info(default_reward_model_path())["properties"]  # the recorded numbers are reproduced
    assert props == pytest.approx(recorded, abs=0.02)


def test_compose_matches_world_rendering() -> None:
    specs = sample_specs(8, seed=11)
    pool = coverage_pool(8, seed=11)
    shape = torch.tensor([SHAPES.index(s.shape) for s in specs])
    colour = torch.tensor([COLOURS.index(s.colour) for s in specs])
    background = torch.tensor([s.background for s in specs])
    torch.testing.assert_close(compose(pool[shape, torch.arange(8)], colour, background), render_batch(specs))


def test_training_is_deterministic() -> None:
    config = dataclasses.replace(TOY_REWARD_CONFIG, steps=40, batch_size=32, pool_size=16)
    a, b = train_reward_model(config, progress=False), train_reward_model(config, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    fresh = build_model(config)
    assert not torch.equal(fresh.image_proj.weight, a.image_proj.weight)


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties get average ranks
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_gold_reward_on_rendered_ground_truth() -> None:
    gold = ToyGoldReward()
    assert isinstance(gold, RewardModel) and not gold.differentiable
    specs = sample_specs(24, seed=7)
    images = render_batch(specs)
    other_colour = [caption_for(COLOURS[(COLOURS.index(s.colour) + 1) % 4], s.shape) for s in specs]
    other_shape = [caption_for(s.colour, SHAPES[(SHAPES.index(s.shape) + 1) % 3]) for s in specs]
    both = [
        caption_for(COLOURS[(COLOURS.index(s.colour) + 1) % 4], SHAPES[(SHAPES.index(s.shape) + 1) % 3]) for s in specs
    ]
    torch.testing.assert_close(gold(images, [s.caption for s in specs]), torch.ones(24))
    torch.testing.assert_close(gold(images, other_colour), torch.full((24,), 0.5))
    torch.testing.assert_close(gold(images, other_shape), torch.full((24,), 0.5))
    torch.testing.assert_close(gold(images, both), torch.zeros(24))
    blank = torch.full((1, 3, 16, 16), 0.2)
    assert gold(blank, ["a red circle"]).item() == 0.0
    # brightness-blind: the same shape on a bright background scores the same
    bright = ShapeSpec("blue", "triangle", cx=8.0, cy=8.0, size=5.0, background=0.9)
    assert gold(render_batch([bright]), ["a blue triangle"]).item() == 1.0
    assert ToyGoldReward(colour_weight=1.0, shape_weight=0.0)(images, other_shape).eq(1.0).all()
