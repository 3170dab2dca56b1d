"""Rewards of the toy world: the pixel-exact gold reward and the learned, brightness-biased reward model.

* :class:`ToyGoldReward`: per image ``colour_weight·[detected colour == prompt colour] + shape_weight·[detected
  shape == prompt shape]`` (0.5 / 0.5 by default), from :mod:`diffalign.toy.metrics`'s pixel detectors. It does not
  see brightness: the background is grey, and the detectors read only the chromatic (shape) pixels.
* :func:`load_toy_reward_model` (re-exported from :mod:`diffalign.toy.reward_model`): the learned reward.
* :func:`shape_boxes`: the bounding box of each image's detected shape, for
  :func:`diffalign.eval.diversity.layout_dispersion`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.rewards.base import check_images
from diffalign.toy.metrics import ImageBatch, _colour_indices, _coverage, as_hwc_batch, colours_of, shapes_of
from diffalign.toy.reward_model import ToyRewardModel, load_toy_reward_model
from diffalign.toy.world import parse_caption

__all__ = [
    "BOX_COVERAGE_MIN",
    "ToyDarkness",
    "ToyGoldReward",
    "ToyRewardModel",
    "gold_colour",
    "gold_shape",
    "load_toy_reward_model",
    "shape_boxes",
]

#: A pixel belongs to the detected shape when its estimated coverage (chroma / palette chroma) reaches this.
BOX_COVERAGE_MIN = 0.5


class ToyGoldReward:
    """Gold reward from pixels: ``colour_weight·[colour correct] + shape_weight·[shape correct]`` per image (a
    :class:`~diffalign.rewards.base.RewardModel`; not differentiable). An image with no visible shape scores 0."""

    differentiable = False

    def __init__(self, *, colour_weight: float = 0.5, shape_weight: float = 0.5, name: str = "toy_gold") -> None:
        self.colour_weight = float(colour_weight)
        self.shape_weight = float(shape_weight)
        self.name = name

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Float32 ``(N,)`` on the images' device."""
        check_images(self.name, images, prompts)
        batch = as_hwc_batch(images)
        wanted = [parse_caption(p) for p in prompts]
        colour_ok = [c == w[0] for c, w in zip(colours_of(batch), wanted, strict=True)]
        shape_ok = [s == w[1] for s, w in zip(shapes_of(batch), wanted, strict=True)]
        score = self.colour_weight * np.asarray(colour_ok, dtype=np.float64)
        score = score + self.shape_weight * np.asarray(shape_ok, dtype=np.float64)
        return torch.as_tensor(score, dtype=torch.float32, device=images.device)


def gold_colour() -> ToyGoldReward:
    """The gold reward's colour half alone (1 when the detected colour is the prompt's): ``toy_gold_colour``."""
    return ToyGoldReward(colour_weight=1.0, shape_weight=0.0, name="toy_gold_colour")


def gold_shape() -> ToyGoldReward:
    """The gold reward's shape half alone: ``toy_gold_shape``."""
    return ToyGoldReward(colour_weight=0.0, shape_weight=1.0, name="toy_gold_shape")


class ToyDarkness:
    """``1 − mean pixel value``: darker images score higher, against the toy reward model's brightness bias
    (``toy_darkness``; with ``prompts_containing`` a specialist that speaks about some prompts only)."""

    name = "toy_darkness"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        return 1.0 - images.float().mean(dim=(1, 2, 3))


def shape_boxes(images: ImageBatch) -> list[np.ndarray]:
    """Per image a float64 ``(k, 4)`` array of ``(x0, y0, x1, y1)`` pixel boxes (``x1``/``y1`` exclusive): the bounding
    box of the pixels whose coverage of the detected colour is ≥ :data:`BOX_COVERAGE_MIN` (``k = 1``), or ``k = 0``
    when no shape is visible."""
    batch = as_hwc_batch(images)
    idx = _colour_indices(batch)
    cov = _coverage(batch, idx)
    out = []
    for k, c in zip(idx, cov, strict=True):
        ys, xs = np.nonzero(c >= BOX_COVERAGE_MIN)
        if k < 0 or len(xs) == 0:
            out.append(np.zeros((0, 4)))
        else:
            out.append(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64))
    return out
