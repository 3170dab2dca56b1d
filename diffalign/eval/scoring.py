"""Score generated images with reward models and measure their diversity per prompt.

* Rewards come from the registry (:func:`diffalign.rewards.build_reward`): a name, plus per-name options such as
  ``{"clip_score": {"model": "/local/clip", "local_files_only": true}}`` (local paths or hub ids, as the reward
  classes' ``from_pretrained`` take them). Every image is scored with ``reward(images, prompts)`` in batches,
  without gradients.
* Diversity per prompt (:mod:`diffalign.eval.diversity`): PVS for every folder; the embedding spread ``1 − IDS`` in
  the image-embedding space of each embedding reward (CLIP-style: ``clip_score``, ``pickscore``, ``hpsv2``, a
  plugin's embedding reward). Prompts with fewer than two images have no spread and are left out of the means.
* Prompt scorers (:class:`PromptScorer`, :func:`register_prompt_scorer`, or a plugin: :mod:`diffalign.plugins`)
  add metrics to the prompt sets they claim: per prompt (averaged into the diversity means) and per folder (a gold
  metric). The toy world's plugin claims its captions (``a <colour> <shape>``, 16×16 images) and adds the attribute
  diversity, the layout dispersion and the colour / shape adherence.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffalign.eval.diversity import embedding_spread, pvs
from diffalign.eval.errors import EvalInputError
from diffalign.eval.folders import ImageFolder
from diffalign.plugins import check_name, load_plugins
from diffalign.rewards import build_reward
from diffalign.rewards.base import RewardModel

#: Metrics of one set of images with their prompts: ``fn(images (N,3,H,W) in [0,1], prompts) -> {metric: value}``.
MetricsFn = Callable[[torch.Tensor, Sequence[str]], Mapping[str, float]]


@dataclass(frozen=True)
class PromptScorer:
    """Extra metrics for the prompt sets a plugin claims (the toy world's gold metric is one).

    * ``claims(prompts, images)``: whether this scorer applies to a folder;
    * ``group_metrics``: metrics of one prompt's images (prompts with ≥ 2 images), in ``per_prompt.csv`` and
      averaged over prompts into ``diversity``;
    * ``summary``: metrics of the whole folder, in ``summary.json`` under ``name`` and in ``report.md`` as a table
      titled ``title``;
    * ``default_rewards``: the rewards :func:`~diffalign.eval.evaluation.evaluate_folders` uses when none are asked.
    """

    name: str
    claims: Callable[[Sequence[str], torch.Tensor | None], bool]
    group_metrics: MetricsFn | None = None
    summary: MetricsFn | None = None
    title: str = ""
    default_rewards: tuple[str, ...] = ()


#: Registered prompt scorers by name (:func:`register_prompt_scorer`; plugins add theirs when first listed).
PROMPT_SCORERS: dict[str, PromptScorer] = {}

# keys of a model's entry in summary.json; a scorer's summary sits beside them under its name
_RESERVED = frozenset({"folder", "images", "prompts", "generation", "scores", "diversity"})


def register_prompt_scorer(scorer: PromptScorer, *, replace: bool = False) -> None:
    """Add ``scorer`` to :data:`PROMPT_SCORERS`; an equal scorer again is a no-op, another under a taken name needs
    ``replace=True``."""
    if not isinstance(scorer, PromptScorer):
        raise TypeError(f"register_prompt_scorer takes a PromptScorer, got {type(scorer).__name__}")
    check_name("prompt scorer", scorer.name)
    if scorer.name in _RESERVED:
        raise ValueError(f"prompt scorer name {scorer.name!r} is a summary.json key; pick another")
    taken = PROMPT_SCORERS.get(scorer.name)
    if taken is not None and taken != scorer and not replace:
        raise ValueError(f"prompt scorer {scorer.name!r} is already registered; pass replace=True to override")
    PROMPT_SCORERS[scorer.name] = scorer


def prompt_scorers() -> list[PromptScorer]:
    """Every registered prompt scorer, plugins' included, in registration order."""
    load_plugins()
    return list(PROMPT_SCORERS.values())


def get_prompt_scorer(name: str) -> PromptScorer:
    """The prompt scorer registered as ``name`` (plugins are loaded if it is not among those known so far)."""
    if name not in PROMPT_SCORERS:
        load_plugins()
    if name not in PROMPT_SCORERS:
        raise EvalInputError(f"unknown prompt scorer {name!r}; registered: {', '.join(PROMPT_SCORERS) or 'none'}")
    return PROMPT_SCORERS[name]


def claiming_scorers(prompts: Sequence[str], images: torch.Tensor | None = None) -> list[PromptScorer]:
    """The registered prompt scorers that claim this prompt set (and images)."""
    return [s for s in prompt_scorers() if s.claims(prompts, images)]


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
    from diffalign.rewards.registry import is_reward, reward_names

    for name in names:
        if not is_reward(name):
            close = difflib.get_close_matches(name, reward_names(), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid names: {', '.join(reward_names())}"
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
    diversity rows, the means over prompts (``diversity``), and per prompt scorer with a ``summary`` its folder
    metrics (``None`` where it does not claim the folder)."""

    folder: ImageFolder
    scores: dict[str, np.ndarray]
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    diversity: dict[str, float] = field(default_factory=dict)
    extra: dict[str, dict[str, float] | None] = field(default_factory=dict)


def score_folder(
    folder: ImageFolder,
    rewards: Mapping[str, RewardModel],
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> FolderScores:
    """Scores, per-prompt diversity and the claiming prompt scorers' metrics of one folder."""
    images, prompts = folder.images, folder.prompts
    scores = {
        name: score_images(r, images, prompts, batch_size=batch_size, device=device) for name, r in rewards.items()
    }
    embeds = {
        name: image_embeddings(r, images, batch_size=batch_size, device=device)
        for name, r in rewards.items()
        if is_embedding_reward(r)
    }
    scorers = prompt_scorers()
    claiming = [s for s in scorers if s.claims(prompts, images)]
    metrics = ["pvs", *(f"embedding_spread_{n}" for n in embeds)]
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
            for scorer in claiming:
                if scorer.group_metrics is not None:
                    values = scorer.group_metrics(images[members], group_prompts)
                    row.update({k: float(v) for k, v in values.items()})
                    metrics += [k for k in values if k not in metrics]
        rows.append(row)
    diversity = {}
    for metric in metrics:
        values = [row[metric] for row in rows if metric in row]
        if values:
            diversity[metric] = float(np.mean(values))
    extra = {
        s.name: ({k: float(v) for k, v in s.summary(images, prompts).items()} if s in claiming else None)
        for s in scorers
        if s.summary is not None
    }
    return FolderScores(folder, scores, rows, diversity, extra)
