"""D²-Align's guided text embedding, the corrected reward wrapper, the online reward builder and prompt files."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffalign.data.prompts import load_prompts
from diffalign.losses.reward_shaping import d2_align_text_embeds
from diffalign.rewards.combine import WeightedSum
from diffalign.rewards.correction import CorrectedReward, CorrectionVector, load_correction, save_correction
from diffalign.rewards.from_config import build_online_reward

REWARD = str(Path(__file__).with_name("online_rewards.py")) + ":mean_colour"


def test_guided_embedding_formula():
    gen = torch.Generator().manual_seed(0)
    e, b = torch.randn(3, 5, generator=gen), torch.randn(5, generator=gen)
    out = d2_align_text_embeds(e, b, omega=1.5)
    plus, minus = (e + b) / (e + b).norm(dim=1, keepdim=True), (e - b) / (e - b).norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, minus + 1.5 * (plus - minus))
    torch.testing.assert_close(d2_align_text_embeds(e, torch.zeros(5), omega=1.5), F.normalize(e, dim=1))
    with pytest.raises(ValueError, match="correction"):
        d2_align_text_embeds(e, torch.zeros(4))


def test_zero_initialised_b_v_gets_a_gradient():
    vector = CorrectionVector(4)
    e = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    image = torch.tensor([[0.2, 0.9, 0.1, 1.0]])
    F.cosine_similarity(image, vector(e, 1.5)).sum().backward()
    assert vector.b_v.grad is not None and vector.b_v.grad.abs().sum() > 0


def test_corrected_reward_scores_against_the_guided_embedding(tmp_path):
    from tests.online_rewards import MeanColourReward

    reward, b_v = MeanColourReward(), torch.tensor([0.0, 0.3, -0.2, 0.1])
    images, prompts = torch.rand(2, 3, 8, 8), ["a red circle", "a blue square"]
    corrected = CorrectedReward(reward, b_v, omega=1.5)
    expected = F.cosine_similarity(reward.image_embeds(images), d2_align_text_embeds(reward.text_embeds(prompts), b_v))
    torch.testing.assert_close(corrected(images, prompts), expected)
    save_correction(b_v, tmp_path, omega=1.5, reward="mean_colour")
    torch.testing.assert_close(load_correction(tmp_path), b_v)
    with pytest.raises(FileNotFoundError, match="direct_stage=correction"):
        load_correction(tmp_path / "missing")


def test_online_reward_builder(tmp_path):
    online = SimpleNamespace(
        reward_functions=[REWARD], reward_options={}, reward_weights=None, reward_correction=None, correction_omega=1.5
    )
    single = build_online_reward(online)
    assert single.name == "mean_colour"
    online.reward_functions, online.reward_weights = [REWARD, "jpeg_compressibility"], [1.0, 0.5]
    combined = build_online_reward(online)
    assert isinstance(combined, WeightedSum)
    images = torch.rand(2, 3, 16, 16)
    parts = [single(images, ["a red circle"] * 2), combined.rewards[1](images, ["a red circle"] * 2)]
    torch.testing.assert_close(combined(images, ["a red circle"] * 2), parts[0] + 0.5 * parts[1])
    save_correction(torch.zeros(4), tmp_path, omega=1.5, reward="mean_colour")
    online.reward_functions, online.reward_weights, online.reward_correction = [REWARD], None, str(tmp_path)
    assert isinstance(build_online_reward(online), CorrectedReward)
    online.reward_functions, online.reward_correction = [str(tmp_path / "missing.py") + ":make"], None
    with pytest.raises(FileNotFoundError, match="online.reward_functions: .*missing.py does not exist"):
        build_online_reward(online)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# toy prompts\na red circle\n\n a blue square \n")
    assert load_prompts(str(txt)) == ["a red circle", "a blue square"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle"}\n{"prompt": "a green triangle"}\n')
    assert load_prompts(str(jsonl), max_samples=1) == ["a red circle"]
    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        load_prompts(str(tmp_path / "missing.txt"))
