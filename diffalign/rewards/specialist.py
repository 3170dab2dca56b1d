"""A reward that applies to some prompts only: NaN elsewhere, which the multi-reward code reads as "no signal here"
(MARBLE's specialist samples: an OCR reward says nothing about a photo of a cat). Set with the reward option
``prompts_containing``::

    online:
      reward_functions: [pickscore, ocr_reward]
      reward_options: {ocr_reward: {prompts_containing: ["sign", "text"]}}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.rewards.base import RewardModel


class PromptSubsetReward:
    """``reward(images, prompts)`` on prompts that contain one of ``keywords`` (case-insensitive), NaN on the rest."""

    differentiable = False

    def __init__(self, reward: RewardModel, keywords: Sequence[str]) -> None:
        if isinstance(keywords, str):
            keywords = [keywords]
        if not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(f"prompts_containing: give one or more non-empty words, got {keywords!r}")
        self.reward = reward
        self.keywords = [k.lower() for k in keywords]
        self.name = getattr(reward, "name", type(reward).__name__)

    def to(self, device: str | torch.device) -> PromptSubsetReward:
        if hasattr(self.reward, "to"):
            self.reward = self.reward.to(device)
        return self

    def applies(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N,) bool: which prompts the reward speaks about."""
        return torch.tensor([any(k in p.lower() for k in self.keywords) for p in prompts], dtype=torch.bool)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = self.reward(images, prompts).float()
        mask = self.applies(prompts).to(scores.device)
        return torch.where(mask, scores, torch.full_like(scores, float("nan")))
