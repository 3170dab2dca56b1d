"""``within_prompt_auc``: hand values, ties, prompts without both kinds, and parity with the Mann-Whitney U
statistic computed from mid-ranks (an independent route to the same number)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffalign.eval.reward_agreement import within_prompt_auc


def test_hand_values_and_ties() -> None:
    prompts = ["a", "a", "a", "b", "b", "c"]
    scores = [3.0, 1.0, 2.0, 5.0, 5.0, 9.0]
    labels = [True, False, False, True, False, True]
    # a: the right sample beats both wrong ones (2 of 2 pairs); b: a tie (1/2 of 1 pair); c: no wrong sample
    assert within_prompt_auc(scores, labels, prompts) == pytest.approx(2.5 / 3, abs=1e-15)
    reversed_scores = [-s for s in scores]
    assert within_prompt_auc(reversed_scores, labels, prompts) == pytest.approx(0.5 / 3, abs=1e-15)
    assert math.isnan(within_prompt_auc([1.0, 2.0], [True, True], ["a", "a"]))


def test_pairs_across_prompts_do_not_count() -> None:
    # every right sample scores below every wrong one of the OTHER prompt, above those of its own
    scores = torch.tensor([1.0, 0.0, 11.0, 10.0])
    labels = np.array([True, False, True, False])
    assert within_prompt_auc(scores, labels, ["a", "a", "b", "b"]) == 1.0


def _mann_whitney_auc(scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # mid-ranks for tied runs
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = int(labels.sum()), int((~labels).sum())
    u = ranks[labels].sum() - n1 * (n1 + 1) / 2
    return u, n1 * n0


def test_parity_with_mann_whitney_u_per_prompt() -> None:
    rng = np.random.default_rng(0)
    prompts = [f"p{k}" for k in range(5) for _ in range(16)]
    scores = rng.integers(0, 6, len(prompts)).astype(float)  # small integers: many ties
    labels = rng.random(len(prompts)) < 0.4
    u_total, pairs_total = 0.0, 0
    for k in range(5):
        rows = np.arange(16 * k, 16 * (k + 1))
        u, pairs = _mann_whitney_auc(scores[rows], labels[rows])
        u_total, pairs_total = u_total + u, pairs_total + pairs
    assert within_prompt_auc(scores, labels, prompts) == pytest.approx(u_total / pairs_total, abs=1e-12)


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="2 scores, 3 labels and 3 prompts"):
        within_prompt_auc([1.0, 2.0], [True, False, True], ["a", "a", "b"])
