"""D²-Align's directional reward correction: a learned vector ``b_v`` in a reward model's text-embedding space.

:class:`CorrectionVector` holds ``b_v`` (stage 1 trains it with the generator frozen); :class:`CorrectedReward` wraps an
:class:`~diffalign.rewards.base.EmbeddingReward` so that it scores images against the guided text embedding
``ẽ = e⁻ + ω(e⁺ − e⁻)`` (:func:`diffalign.losses.reward_shaping.d2_align_text_embeds`) — a drop-in reward for
stage 2 (direct reward back-propagation) and for the group RL trainer. Paper: arXiv 2512.24146 (no code released).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffalign.losses.reward_shaping import d2_align_text_embeds
from diffalign.rewards.base import EmbeddingReward, check_images

CORRECTION_FILE = "correction.safetensors"


class CorrectionVector(torch.nn.Module):
    """The single direction ``b_v`` ``(D,)``, initialised at zero (the normalisations still give it a gradient)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.b_v = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, text_embeds: torch.Tensor, omega: float) -> torch.Tensor:
        return d2_align_text_embeds(text_embeds, self.b_v.to(text_embeds.dtype), omega=omega)


def save_correction(vector: torch.Tensor, directory: str | os.PathLike, *, omega: float, reward: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CORRECTION_FILE
    save_file(
        {"b_v": vector.detach().float().cpu().contiguous()},
        str(path),
        metadata={"omega": json.dumps(omega), "reward": reward},
    )
    return path


def load_correction(path: str | os.PathLike) -> torch.Tensor:
    """``b_v`` from a ``correction.safetensors`` file or the folder (a stage-1 run's output) that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / CORRECTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no D²-Align correction vector here; run train.method=direct_reward with "
            "online.direct_stage=correction first (it writes correction.safetensors to its output_dir)"
        )
    return load_file(str(path))["b_v"]


class CorrectedReward:
    """``reward(images, prompts) = score(Φ_img(images), ẽ(prompts; b_v))`` with a fixed or trainable ``b_v``."""

    differentiable = True

    def __init__(self, reward: EmbeddingReward, correction: CorrectionVector | torch.Tensor, *, omega: float = 1.5):
        if not isinstance(reward, EmbeddingReward):
            raise TypeError(
                f"D²-Align corrects a reward's text-embedding space: '{getattr(reward, 'name', reward)}' has none "
                "(use a CLIP-style reward: clip_score, pickscore, hpsv2 or toy_reward_model)"
            )
        self.reward = reward
        self.correction = correction
        self.omega = omega
        self.name = f"{reward.name}_d2"
        self.differentiable = reward.differentiable

    def vector(self) -> torch.Tensor:
        return self.correction.b_v if isinstance(self.correction, CorrectionVector) else self.correction

    def guided_text_embeds(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        text = self.reward.text_embeds(list(prompts)).to(device)
        return d2_align_text_embeds(text, self.vector().to(device, text.dtype), omega=self.omega)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return self.reward.image_embeds(images)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.guided_text_embeds(prompts, self.vector().device)

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.reward.score_embeds(image_embeds, text_embeds)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        return self.reward.score_embeds(
            self.reward.image_embeds(images), self.guided_text_embeds(prompts, images.device)
        )
