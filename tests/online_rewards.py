"""A tiny embedding reward for the online-trainer tests (loaded as ``tests/online_rewards.py:mean_colour``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffalign.rewards.base import check_images

COLOURS = ("red", "green", "blue")


class MeanColourReward:
    """``cos([mean R, mean G, mean B, 1], [red?, green?, blue?, 0.5])``: the prompt's colour channel, brighter is
    better (a brightness bias of its own)."""

    name = "mean_colour"
    differentiable = True

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean(dim=(2, 3)), torch.ones(images.shape[0], 1, device=images.device)], dim=1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([[float(c in p) for c in COLOURS] + [0.5] for p in prompts])

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(image_embeds.float(), text_embeds.to(image_embeds.device).float(), dim=-1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        return self.score_embeds(self.image_embeds(images), self.text_embeds(prompts))


def mean_colour() -> MeanColourReward:
    return MeanColourReward()


class DarknessReward:
    """``1 − mean brightness``: darker is better, against :class:`MeanColourReward`'s brightness bias."""

    name = "darkness"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        return 1.0 - images.mean(dim=(1, 2, 3))


class RedOnlyReward:
    """The red channel's mean on prompts that name red, NaN elsewhere (a specialist reward: no signal there)."""

    name = "red_only"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        red = images[:, 0].mean(dim=(1, 2))
        applies = torch.tensor(["red" in p for p in prompts], device=images.device)
        return torch.where(applies, red, torch.full_like(red, float("nan")))


def darkness() -> DarknessReward:
    return DarknessReward()


def red_only() -> RedOnlyReward:
    return RedOnlyReward()
