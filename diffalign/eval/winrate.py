"""Win rate of model A over model B on the same prompts and seeds, with a bootstrap confidence interval.

Definition. Sample ``s`` of prompt ``p`` from A is compared with sample ``s`` of prompt ``p`` from B (generated from
the same noise when both folders used the same seed, :mod:`diffalign.eval.generation`): a win counts 1, a tie
(equal scores) 1/2, a loss 0. The per-prompt win rate is the mean over that prompt's samples, and the win rate is
the mean over prompts (every prompt weighs the same, whatever its number of samples).

Interval (ours). Prompts are the unit of resampling, samples within a prompt stay together: ``n_resamples`` times
draw ``P`` prompts with replacement (``numpy.random.default_rng(seed)``, one ``integers(0, P, (n_resamples, P))``
draw) and average their per-prompt win rates; the interval is the percentile interval
``[q_{(1−c)/2}, q_{(1+c)/2}]`` of those means (``numpy.percentile``, linear interpolation), ``c = confidence``
(default 0.95). The same seed gives the same interval. It reflects prompt-to-prompt variation only, not the
sampling noise within a prompt, and with few prompts (< ~20) it is too narrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class WinRate:
    """``estimate`` (mean per-prompt win rate), ``low`` / ``high`` (bootstrap percentile interval, ``None`` without
    resamples), ``per_prompt`` (P,), and pair counts."""

    estimate: float
    low: float | None
    high: float | None
    per_prompt: np.ndarray
    wins: int
    ties: int
    losses: int
    n_resamples: int
    confidence: float
    seed: int

    @property
    def n_prompts(self) -> int:
        return len(self.per_prompt)


def pair_outcomes(scores_a: np.ndarray, scores_b: np.ndarray) -> np.ndarray:
    """1 where A scores higher, 0.5 on ties, 0 where B scores higher."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"win rate: scores of A {a.shape} and B {b.shape} must be 1-d of the same length")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def per_prompt_win_rates(scores_a: np.ndarray, scores_b: np.ndarray, prompt_ids: Sequence[int]) -> np.ndarray:
    """``(P,)`` win rate of each prompt, in order of first appearance of its id."""
    outcome = pair_outcomes(scores_a, scores_b)
    if len(prompt_ids) != len(outcome):
        raise ValueError(f"win rate: {len(outcome)} score pairs but {len(prompt_ids)} prompt ids")
    order: dict[int, list[int]] = {}
    for row, p in enumerate(prompt_ids):
        order.setdefault(int(p), []).append(row)
    if not order:
        raise ValueError("win rate: no scores")
    return np.array([outcome[rows].mean() for rows in order.values()])


def bootstrap_interval(
    per_prompt: np.ndarray, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean of ``per_prompt`` under resampling prompts with replacement."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: expected a value in (0, 1)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}: expected >= 1")
    values = np.asarray(per_prompt, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(1)
    low, high = np.percentile(means, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return float(low), float(high)


def win_rate(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    prompt_ids: Sequence[int],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> WinRate:
    """Win rate of A over B (see module docstring); ``n_resamples = 0`` skips the interval."""
    outcome = pair_outcomes(scores_a, scores_b)
    per_prompt = per_prompt_win_rates(scores_a, scores_b, prompt_ids)
    low = high = None
    if n_resamples > 0:
        low, high = bootstrap_interval(per_prompt, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return WinRate(
        estimate=float(per_prompt.mean()),
        low=low,
        high=high,
        per_prompt=per_prompt,
        wins=int((outcome == 1.0).sum()),
        ties=int((outcome == 0.5).sum()),
        losses=int((outcome == 0.0).sum()),
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )
