"""How far a reward agrees with a ground truth *within* a prompt, the only comparison group-relative RL sees.

Flow-GRPO, DanceGRPO and GRPO-Guard standardise rewards per prompt (or per epoch after a per-prompt mean), so a
reward that is biased in a way shared by all samples of a prompt moves nothing; what steers the policy is how the
reward orders the samples of one prompt. :func:`within_prompt_auc` measures exactly that order against a binary
ground truth (e.g. "the image has the colour its prompt names"): the probability that, for a random prompt and a
random pair of its samples of which one is right and one wrong, the reward scores the right one higher (ties count
one half) — the area under the ROC curve, pooled over the pairs of every prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffalign.eval.diversity import rows_by_prompt


def within_prompt_auc(
    scores: torch.Tensor | np.ndarray | Sequence[float],
    labels: torch.Tensor | np.ndarray | Sequence[bool],
    prompts: Sequence[str],
) -> float:
    """P(score(right) > score(wrong)) over same-prompt pairs (ties 1/2); ``nan`` if no prompt has both kinds."""
    scores = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    labels = np.asarray(labels, dtype=bool)
    if not len(scores) == len(labels) == len(prompts):
        raise ValueError(
            f"{len(scores)} scores, {len(labels)} labels and {len(prompts)} prompts: pass one of each per sample"
        )
    wins, pairs = 0.0, 0
    for index in rows_by_prompt(prompts).values():
        s, y = scores[index], labels[index]
        right, wrong = s[y][:, None], s[~y][None, :]
        wins += float((right > wrong).sum() + 0.5 * (right == wrong).sum())
        pairs += right.size * wrong.size
    return wins / pairs if pairs else float("nan")
