"""The toy world as a diffalign plugin (entry point ``diffalign.plugins: toy``), registered as a user's would be:

* rewards ``toy_gold`` (:class:`~diffalign.toy.rewards.ToyGoldReward`) and ``toy_reward_model``
  (:func:`~diffalign.toy.rewards.load_toy_reward_model`), imported when built;
* captioner ``toy`` (``diffalign-data caption --model toy``): :class:`ToyCaptioner`, the pixel detector;
* prompt scorer ``toy`` (:data:`TOY_SCORER`): claims toy captions on 16×16 images; per prompt the attribute
  diversity and the layout dispersion of the detected shapes' boxes, per folder the colour / shape adherence, and
  ``toy_gold`` as the default reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from diffalign.eval.diversity import layout_dispersion
from diffalign.toy.metrics import colour_adherence, colours_of, diversity_report, shape_adherence, shapes_of
from diffalign.toy.world import RESOLUTION, parse_caption

NAME = "toy"


class ToyCaptioner:
    """The toy world's stand-in for a VLM (``--model toy``): its pixel detector (``diffalign.toy.metrics``) names
    each image's colour and shape in the world's caption form, ``"a red circle"``; ``"an empty image"`` where it sees
    no shape.
    Prompts are ignored: the caption is what is in the image, which is what DCPO-c asks of a captioner."""

    def __init__(self, **_options: Any) -> None:  # the command's VLM options (task, template, ...) do not apply
        pass

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        if not images:
            return []
        size = (RESOLUTION, RESOLUTION)
        arrays = [img.convert("RGB") if img.size == size else img.convert("RGB").resize(size) for img in images]
        # shapes_of names a shape exactly where colours_of finds a colour
        return [f"a {colour} {shape}" if colour else "an empty image"
                for colour, shape in zip(colours_of(arrays), shapes_of(arrays), strict=True)]  # fmt: skip


def is_toy_prompt_set(prompts: Sequence[str], images: torch.Tensor | None = None) -> bool:
    """Whether every prompt is a toy-world caption (and the images have the toy resolution)."""
    if images is not None and tuple(images.shape[-2:]) != (RESOLUTION, RESOLUTION):
        return False
    try:
        for prompt in set(prompts):
            parse_caption(prompt)
    except ValueError:
        return False
    return bool(prompts)


def group_metrics(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """One prompt's images: ``toy_diversity`` (attribute spread) and ``layout_dispersion`` (detected boxes)."""
    from diffalign.toy.rewards import shape_boxes

    return {
        "toy_diversity": diversity_report(images, prompts)["diversity"],
        "layout_dispersion": layout_dispersion(shape_boxes(images), prompts),
    }


def gold_summary(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """A folder's gold metrics: ``colour_adherence`` and ``shape_adherence`` (pixel detectors)."""
    return {"colour_adherence": colour_adherence(images, prompts), "shape_adherence": shape_adherence(images, prompts)}


def register() -> None:
    """Register the toy rewards, captioner and prompt scorer (idempotent)."""
    from data_tools.caption import register_captioner
    from diffalign.eval.scoring import PromptScorer, register_prompt_scorer
    from diffalign.rewards.registry import register_reward

    register_reward("toy_gold", "diffalign.toy.rewards:ToyGoldReward")
    register_reward("toy_reward_model", "diffalign.toy.rewards:load_toy_reward_model")
    register_reward("toy_gold_colour", "diffalign.toy.rewards:gold_colour")
    register_reward("toy_gold_shape", "diffalign.toy.rewards:gold_shape")
    register_reward("toy_darkness", "diffalign.toy.rewards:ToyDarkness")
    register_captioner(NAME, ToyCaptioner)
    register_prompt_scorer(
        PromptScorer(
            name=NAME,
            claims=is_toy_prompt_set,
            group_metrics=group_metrics,
            summary=gold_summary,
            title="Toy gold metrics (pixel detectors)",
            default_rewards=("toy_gold",),
        )
    )
