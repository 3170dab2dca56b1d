"""Several rewards behind one call: ``Σ_k w_k · r_k(images, prompts)`` of the raw (unnormalised) scores.

This is flow_grpo's ``multi_score`` (``reward_fn = {"pickscore": 1.0, ...}``; the weighted sum is its ``avg`` key)
[CODE yifan123/flow_grpo ``rewards.py``]. :meth:`WeightedSum.per_reward` returns each member's raw scores for logging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.rewards.base import RewardModel, check_images


class WeightedSum:
    """``Σ w_k · r_k``; differentiable iff every member is. Members keep their own devices; scores are moved to the
    images' device."""

    name = "weighted_sum"

    def __init__(self, rewards: Sequence[RewardModel], weights: Sequence[float] | None = None) -> None:
        rewards = list(rewards)
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"WeightedSum got {len(rewards)} rewards but {len(weights)} weights")
        self.rewards = rewards
        self.weights = weights
        self.names = self._unique_names([getattr(r, "name", type(r).__name__) for r in rewards])
        self.differentiable = all(getattr(r, "differentiable", False) for r in rewards)

    @staticmethod
    def _unique_names(names: list[str]) -> list[str]:
        counts = {name: names.count(name) for name in names}
        seen: dict[str, int] = {}
        out = []
        for name in names:
            if counts[name] > 1:
                seen[name] = seen.get(name, 0) + 1
                name = f"{name}_{seen[name]}"
            out.append(name)
        return out

    def to(self, device: str | torch.device) -> WeightedSum:
        """Move every member that can be moved; returns ``self``."""
        self.rewards = [r.to(device) if hasattr(r, "to") else r for r in self.rewards]
        return self

    def per_reward(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: (N,) raw scores}`` of every member (names made unique with ``_1``, ``_2`` suffixes)."""
        check_images(self.name, images, prompts)
        return {
            name: reward(images, prompts).float().to(images.device)
            for name, reward in zip(self.names, self.rewards, strict=True)
        }

    def combine(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of a :meth:`per_reward` result (avoids scoring twice when also logging). A NaN score marks
        a reward that does not apply to the sample (a specialist reward on another kind of prompt) and adds nothing;
        a sample that no reward applies to sums to NaN."""
        stacked = torch.stack([scores[name].float() for name in self.names])
        weights = torch.tensor(self.weights, dtype=stacked.dtype, device=stacked.device)[:, None]
        total = torch.nan_to_num(stacked * weights, nan=0.0).sum(dim=0)
        return torch.where(torch.isnan(stacked).all(dim=0), torch.full_like(total, float("nan")), total)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.combine(self.per_reward(images, prompts))
