"""Score generated images with reward models and measure their diversity per prompt.

* Rewards come from the registry (:func:`diffalign.rewards.build_reward`): a name, plus per-name options such as
  ``{"clip_score": {"model": "/local/clip", "local_files_only": true}}`` (local paths or hub ids, as the reward
  classes' ``from_pretrained`` take them). Every image is scored with ``reward(images, prompts)`` in batches,
  without gradients.
* Diversity per prompt (:mod:`diffalign.eval.diversity`): PVS for every folder; the embedding spread ``1 − IDS`` in
  the image-embedding space of each embedding reward (CLIP-style: ``clip_score``, ``pickscore``, ``hpsv2``,
  ``toy_reward_model``); for toy-world prompts (``a <colour> <shape>``, 16×16 images) also the toy attribute
  diversity (:func:`diffalign.toy.metrics.diversity_report`) and the layout dispersion of the detected shapes'
  boxes, plus the toy gold metrics (colour / shape adherence, :func:`diffalign.toy.metrics.summarize`).
  Prompts with fewer than two images have no spread and are left out of the means.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffalign.eval.diversity import embedding_spread, layout_dispersion, pvs
from diffalign.eval.errors import EvalInputError
from diffalign.eval.folders import ImageFolder
from diffalign.rewards import build_reward
from diffalign.rewards.base import RewardModel


def is_toy_prompt_set(prompts: Sequence[str], images: torch.Tensor | None = None) -> bool:
    """Whether every prompt is a toy-world caption (and the images have the toy resolution)."""
    from diffalign.toy.world import RESOLUTION, parse_caption

    if images is not None and tuple(images.shape[-2:]) != (RESOLUTION, RESOLUTION):
        return False
    try:
        for prompt in set(prompts):
            parse_caption(prompt)
    except ValueError:
        return False
    return bool(prompts)


def parse_reward_names(text: str | Sequence[str] | None) -> list[str]:
    if text is None:
        return []
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [n.strip() for n in text]
    names = [n for n in names if n]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvalInputError(f"--rewards: reward(s) {duplicates} requested twice")
    return names


def build_eval_rewards(
    names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None, device: str | None = None
) -> dict[str, RewardModel]:
    """``{name: reward}`` built from the registry with ``options[name]`` as keyword arguments."""
    from diffalign.rewards.registry import REWARDS

    for name in names:
        if name not in REWARDS:
            close = difflib.get_close_matches(name, list(REWARDS), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid names: {', '.join(sorted(REWARDS))}"
            raise EvalInputError(f"--rewards: unknown reward '{name}'; {hint}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(names))
    if unknown:
        requested = list(names)
        raise EvalInputError(f"--reward-options names {unknown}, which are not among the requested rewards {requested}")
    out = {}
    for name in names:
        extra = options.get(name, {})
        if not isinstance(extra, Mapping):
            raise EvalInputError(f"--reward-options[{name!r}] must be a JSON object of keyword arguments: {extra!r}")
        out[name] = build_reward({"name": name, **extra}, device=device)
    return out


def _device_of(reward: Any, fallback: str) -> torch.device:
    device = getattr(reward, "device", None)
    return torch.device(device) if device is not None else torch.device(fallback)


@torch.no_grad()
def score_images(
    reward: RewardModel, images: torch.Tensor, prompts: Sequence[str], *, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Float64 ``(N,)``: ``reward(images, prompts)`` computed ``batch_size`` images at a time."""
    target = _device_of(reward, device)
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = images[i : i + batch_size].to(target)
        out.append(reward(batch, list(prompts[i : i + batch_size])).detach().double().cpu().numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def is_embedding_reward(reward: Any) -> bool:
    return callable(getattr(reward, "image_embeds", None))


@torch.no_grad()
def image_embeddings(reward: Any, images: torch.Tensor, *, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    target = _device_of(reward, device)
    chunks = [
        reward.image_embeds(images[i : i + batch_size].to(target)).detach().double().cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


@dataclass
class FolderScores:
    """Everything measured on one folder: per-image ``scores[reward]`` (canonical image order), per-prompt
    diversity rows, the means over prompts (``diversity``), and the toy gold summary (toy prompts only)."""

    folder: ImageFolder
    scores: dict[str, np.ndarray]
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    diversity: dict[str, float] = field(default_factory=dict)
    toy: dict[str, float] | None = None


def score_folder(
    folder: ImageFolder,
    rewards: Mapping[str, RewardModel],
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> FolderScores:
    """Scores, per-prompt diversity and (toy prompts) gold metrics of one folder."""
    images, prompts = folder.images, folder.prompts
    scores = {
        name: score_images(r, images, prompts, batch_size=batch_size, device=device) for name, r in rewards.items()
    }
    embeds = {
        name: image_embeddings(r, images, batch_size=batch_size, device=device)
        for name, r in rewards.items()
        if is_embedding_reward(r)
    }
    toy = is_toy_prompt_set(prompts, images)
    boxes = None
    if toy:
        from diffalign.toy.rewards import shape_boxes

        boxes = shape_boxes(images)
    rows = []
    for p, members in folder.groups().items():
        row: dict[str, Any] = {"prompt_index": p, "prompt": prompts[members[0]], "n": len(members)}
        for name, values in scores.items():
            row[f"mean_{name}"] = float(values[members].mean())
        if len(members) >= 2:
            group_prompts = [prompts[i] for i in members]
            row["pvs"] = pvs(images[members])
            for name, e in embeds.items():
                row[f"embedding_spread_{name}"] = embedding_spread(e[members], group_prompts)
            if toy:
                from diffalign.toy.metrics import diversity_report

                row["toy_diversity"] = diversity_report(images[members], group_prompts)["diversity"]
                row["layout_dispersion"] = layout_dispersion([boxes[i] for i in members], group_prompts)
        rows.append(row)
    metrics = ["pvs", *(f"embedding_spread_{n}" for n in embeds)] + (["toy_diversity", "layout_dispersion"] * toy)
    diversity = {}
    for metric in metrics:
        values = [row[metric] for row in rows if metric in row]
        if values:
            diversity[metric] = float(np.mean(values))
    summary = None
    if toy:
        from diffalign.toy.metrics import colour_adherence, shape_adherence

        summary = {
            "colour_adherence": colour_adherence(images, prompts),
            "shape_adherence": shape_adherence(images, prompts),
        }
    return FolderScores(folder, scores, rows, diversity, summary)
