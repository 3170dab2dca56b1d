"""Reward models by name: ``build_reward("pickscore")`` or ``build_reward({"name": "clip_score", "scale": "hessel"})``.

``REWARDS`` maps a name to a builder called with the spec's other keys as keyword arguments (the ``from_pretrained``
options of the class, e.g. ``model``, ``local_files_only``, ``checkpoint``). A string entry ``"module:attribute"``
is imported only when that reward is built. :func:`build_rewards` turns several specs (and weights) into one
:class:`~diffalign.rewards.combine.WeightedSum` (flow_grpo's ``multi_score``).

More rewards come from :func:`register_reward` (in code) or from plugins (:mod:`diffalign.plugins`, loaded the first
time a name is not found; the toy world's ``toy_gold`` and ``toy_reward_model`` arrive that way).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

from diffalign.errors import DiffalignError
from diffalign.plugins import check_name, load_plugins
from diffalign.rewards.aesthetic import LAIONAesthetic
from diffalign.rewards.base import RewardModel
from diffalign.rewards.clip_score import CLIPScore
from diffalign.rewards.combine import WeightedSum
from diffalign.rewards.hpsv2 import HPSv2
from diffalign.rewards.jpeg import JPEGCompressibility
from diffalign.rewards.pickscore import PickScore


class UnknownRewardError(DiffalignError, ValueError):
    """A reward name that is not in :data:`REWARDS` (the message lists the valid names and the nearest one)."""


RewardSpec = Union[str, Mapping[str, Any]]  # noqa: UP007 - a runtime alias; py310 has no `type` statement

REWARDS: dict[str, Callable[..., RewardModel] | str] = {
    "clip_score": CLIPScore.from_pretrained,
    "pickscore": PickScore.from_pretrained,
    "hpsv2": HPSv2.from_pretrained,
    "aesthetic": LAIONAesthetic.from_pretrained,
    "jpeg_compressibility": JPEGCompressibility,
}


def register_reward(name: str, builder: Callable[..., RewardModel] | str, *, replace: bool = False) -> None:
    """Make ``build_reward(name)`` call ``builder`` (a callable, or ``"module:attribute"`` imported when built).

    Registering the same builder again is a no-op; a different builder under a taken name needs ``replace=True``."""
    check_name("reward", name)
    if not (callable(builder) or (isinstance(builder, str) and ":" in builder)):
        raise TypeError(f"reward {name!r}: the builder must be callable or 'module:attribute', got {builder!r}")
    if name in REWARDS and REWARDS[name] != builder and not replace:
        raise ValueError(f"reward {name!r} is already registered ({REWARDS[name]!r}); pass replace=True to override")
    REWARDS[name] = builder


def is_reward(name: str) -> bool:
    """Whether ``name`` is a registered reward (plugins are loaded if it is not among those known so far)."""
    if name not in REWARDS:
        load_plugins()
    return name in REWARDS


def reward_names() -> list[str]:
    """Every registered reward name, sorted, plugins' included."""
    load_plugins()
    return sorted(REWARDS)


def _resolve(name: str, entry: Callable[..., RewardModel] | str) -> Callable[..., RewardModel]:
    if callable(entry):
        return entry
    module_name, _, attribute = entry.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"reward {name!r} is provided by {entry!r}, which could not be imported: {error}") from error


def _split_spec(spec: RewardSpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"reward spec {dict(spec)} has no 'name'; expected {{'name': <one of {sorted(REWARDS)}>}}")
        options = {key: value for key, value in spec.items() if key != "name"}
        return str(spec["name"]), options
    raise TypeError(f"a reward spec is a name or a dict with a 'name' key, got {type(spec).__name__}")


def build_reward(spec: RewardSpec, device: str | torch.device | None = None) -> RewardModel:
    """One reward model from a name or ``{"name": ..., **options}``; moved to ``device`` if given."""
    name, options = _split_spec(spec)
    if not is_reward(name):
        near = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UnknownRewardError(f"unknown reward {name!r}; valid names: {', '.join(reward_names())}{hint}")
    builder = _resolve(name, REWARDS[name])
    try:
        reward = builder(**options)
    except TypeError as error:
        raise TypeError(f"reward {name!r} could not be built from options {options}: {error}") from error
    if device is not None and hasattr(reward, "to"):
        reward = reward.to(device)
    return reward


def build_rewards(
    specs: RewardSpec | Sequence[RewardSpec] | Mapping[str, float],
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> RewardModel:
    """One reward, or a :class:`WeightedSum` of several.

    ``specs``: a spec, a list of specs (with ``weights``, default all 1), or a flow_grpo-style ``{name: weight}``
    mapping (a mapping without a ``"name"`` key). A single spec with weight 1 (or none) returns the reward itself.
    """
    if isinstance(specs, Mapping) and "name" not in specs:
        if weights is not None:
            raise ValueError("pass weights either in the {name: weight} mapping or as `weights`, not both")
        weights = [float(w) for w in specs.values()]
        specs = list(specs.keys())
    if isinstance(specs, (str, Mapping)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise ValueError("build_rewards needs at least one reward spec")
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"got {len(specs)} reward specs but {len(weights)} weights")
    rewards = [build_reward(spec, device=device) for spec in specs]
    if len(rewards) == 1 and (weights is None or float(weights[0]) == 1.0):
        return rewards[0]
    return WeightedSum(rewards, weights)
