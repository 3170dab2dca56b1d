"""Build the reward an online diffusion trainer optimises from its ``online`` config section."""

from __future__ import annotations

from typing import Any

from diffalign.rewards.base import RewardModel
from diffalign.rewards.combine import WeightedSum
from diffalign.rewards.correction import CorrectedReward, load_correction
from diffalign.rewards.registry import REWARDS, build_reward
from diffalign.rewards.specialist import PromptSubsetReward
from diffalign.utils.imports import load_callable


def reward_from_name(name: str, options: dict[str, Any] | None = None) -> RewardModel:
    """A registry name (``pickscore``, ``toy_reward_model``, ...) or ``module:callable`` / ``file.py:callable`` that
    returns a reward model when called with the options as keyword arguments. The option ``prompts_containing``
    (a word or a list) limits the reward to the prompts that contain one (NaN elsewhere:
    :class:`~diffalign.rewards.specialist.PromptSubsetReward`)."""
    options = dict(options or {})
    keywords = options.pop("prompts_containing", None)
    if name in REWARDS or ":" not in name:
        reward = build_reward({"name": name, **options})
    else:
        reward = load_callable(name)(**options)
    return PromptSubsetReward(reward, keywords) if keywords is not None else reward


def build_online_reward(online: Any, device: Any = None) -> RewardModel:
    """The weighted sum of ``online.reward_functions`` (one reward alone when there is one), with D²-Align's frozen
    correction applied when ``online.reward_correction`` names a ``b_v`` file (a single embedding reward only)."""
    rewards = [reward_from_name(n, online.reward_options.get(n)) for n in online.reward_functions]
    if device is not None:
        rewards = [r.to(device) if hasattr(r, "to") else r for r in rewards]
    if online.reward_correction:
        if len(rewards) != 1:
            raise ValueError("online.reward_correction applies to one embedding reward; list exactly one reward")
        vector = load_correction(online.reward_correction)
        return CorrectedReward(
            rewards[0], vector.to(device) if device is not None else vector, omega=online.correction_omega
        )
    if len(rewards) == 1 and not online.reward_weights:
        return rewards[0]
    return WeightedSum(rewards, online.reward_weights or [1.0] * len(rewards))
