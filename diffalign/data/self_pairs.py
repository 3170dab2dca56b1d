"""Self-generated preference pairs and SAIL's ranked preference mixup (SAIL, arXiv 2602.05380).

* :func:`best_worst_pairs`: per prompt group, the highest-reward candidate against the lowest (one pair per group;
  the paper's ablation prefers best–worst to random pairs). Groups whose best and worst tie are left out.
* :func:`mix_with_seed`: the round's training set is the whole seed set plus self-generated pairs making up the
  fraction ``α`` of the mixture (``α = 0.25``: 25 % self-generated, 75 % seed). The number of self pairs is
  ``round(α/(1 − α)·|seed|)``, drawn without replacement from the round's pairs in a seeded order, cycling through
  them again when the round produced fewer (ours: the paper does not say how the mixture is sampled).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from diffalign.data.pickapic import IMAGE_COLUMNS, BadRowError, image_cell_bytes
from diffalign.data.synthetic import encode_png
from diffalign.utils.images import to_uint8


def image_bytes(image: torch.Tensor) -> bytes:
    """PNG bytes of a ``[3, H, W]`` float image in [0, 1]."""
    return encode_png(Image.fromarray(to_uint8(image[None])[0], mode="RGB"))


def best_worst_pairs(
    images: torch.Tensor, prompts: Sequence[str], rewards: torch.Tensor, groups: Sequence[int]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Pick-a-Pic rows (winner ``jpg_0``, ``label_0 = 1``) of each group's best vs worst candidate, and statistics:
    ``pairs``, ``tied_groups``, ``mean_margin`` (reward best − worst) and ``confident_fraction`` (pairs whose
    ``σ(margin) > 0.9``; the paper's sign of self-reward inflation)."""
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(int(g), []).append(i)
    rows, margins, tied = [], [], 0
    for members in by_group.values():
        scores = rewards[members]
        best, worst = members[int(scores.argmax())], members[int(scores.argmin())]
        margin = float(rewards[best] - rewards[worst])
        if margin <= 0:
            tied += 1
            continue
        margins.append(margin)
        rows.append(
            {
                "jpg_0": image_bytes(images[best]),
                "jpg_1": image_bytes(images[worst]),
                "label_0": 1.0,
                "label_1": 0.0,
                "caption": prompts[best],
                "reward_margin": margin,
            }
        )
    m = torch.tensor(margins)
    stats = {
        "pairs": float(len(rows)),
        "tied_groups": float(tied),
        "mean_margin": float(m.mean()) if len(m) else 0.0,
        "confident_fraction": float((torch.sigmoid(m) > 0.9).float().mean()) if len(m) else 0.0,
    }
    return rows, stats


def read_rows(path: str | Path, columns: Sequence[str] = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")) -> list:
    """The rows of a Pick-a-Pic parquet file as dicts, image cells (bytes or ``{"bytes", "path"}`` structs) as bytes
    (:func:`~diffalign.data.pickapic.image_cell_bytes`); a missing image raises ``BadRowError`` naming file and row."""
    rows = pq.read_table(path, columns=list(columns)).to_pylist()
    for i, row in enumerate(rows):
        for key in IMAGE_COLUMNS:
            row[key], problem = image_cell_bytes(row[key], key, verify=False)
            if problem:
                raise BadRowError(f"{path}: row {i}: {problem}")
    return rows


def mix_with_seed(
    seed_rows: Sequence[dict], self_rows: Sequence[dict], *, self_fraction: float, seed: int = 0
) -> list[dict]:
    """Seed rows plus ``round(α/(1 − α)·len(seed_rows))`` self-generated rows (see the module docstring)."""
    if not 0 <= self_fraction < 1:
        raise ValueError(f"self_fraction={self_fraction}: must be in [0, 1)")
    wanted = round(self_fraction / (1.0 - self_fraction) * len(seed_rows))
    if wanted and not self_rows:
        raise ValueError("mix_with_seed: the round produced no self-generated pairs (every group tied)")
    order = np.random.default_rng(seed).permutation(len(self_rows)) if self_rows else np.zeros(0, dtype=int)
    picked = [self_rows[int(order[i % len(order)])] for i in range(wanted)]
    keep = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")
    return [{k: r[k] for k in keep} for r in (*seed_rows, *picked)]
