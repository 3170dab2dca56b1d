"""PNG figures of an evaluation: image grids (prompts × samples, :func:`diffalign.eval.grid.labelled_grid`) and
matplotlib plots (score histograms per model, per-prompt mean score A vs B, win rates with their intervals).

matplotlib is used through ``matplotlib.figure.Figure`` (no pyplot, no global backend state, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from diffalign.eval.folders import ImageFolder
from diffalign.eval.grid import labelled_grid
from diffalign.eval.winrate import WinRate

#: grids show at most this many prompts (rows) and samples (columns); tiles are at most ``MAX_TILE`` pixels
MAX_GRID_PROMPTS = 16
MAX_GRID_SAMPLES = 8
MAX_TILE = 128


def _tiles(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Images shrunk to at most ``MAX_TILE`` pixels (antialiased) and the integer upscale that brings small ones
    to ≈ 64 pixels."""
    h = images.shape[-1]
    if h > MAX_TILE:
        images = torch.nn.functional.interpolate(images, size=(MAX_TILE, MAX_TILE), mode="bilinear", antialias=True)
        h = MAX_TILE
    return images, max(1, 64 // h)


def _label(text: str, width: int = 19) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def folder_grid(folder: ImageFolder, path: str | os.PathLike, title: str | None = None) -> Path:
    """One row per prompt (first :data:`MAX_GRID_PROMPTS`), its first :data:`MAX_GRID_SAMPLES` samples."""
    groups = list(folder.groups().items())[:MAX_GRID_PROMPTS]
    images, scale = _tiles(folder.images)
    rows = [images[members[:MAX_GRID_SAMPLES]] for _, members in groups]
    labels = [_label(f"{p}: {folder.entries[members[0]]['prompt']}") for p, members in groups]
    n = max(len(r) for r in rows)
    columns = [f"s{i}" for i in range(n)]
    if title:
        columns[0] = _label(f"{title} s0", 12)
    return labelled_grid(rows, labels, path, scale=scale, column_labels=columns)


def comparison_grid(a: ImageFolder, b: ImageFolder, names: Sequence[str], path: str | os.PathLike) -> Path:
    """Rows alternate A and B for each prompt (first ``MAX_GRID_PROMPTS // 2``): same prompt, same sample column."""
    images_a, scale = _tiles(a.images)
    images_b, _ = _tiles(b.images)
    if images_a.shape[-1] != images_b.shape[-1]:
        images_b = torch.nn.functional.interpolate(images_b, size=images_a.shape[-2:], mode="bilinear", antialias=True)
    groups_b = b.groups()
    rows, labels = [], []
    for p, members in list(a.groups().items())[: MAX_GRID_PROMPTS // 2]:
        prompt = a.entries[members[0]]["prompt"]
        rows += [images_a[members[:MAX_GRID_SAMPLES]], images_b[groups_b[p][:MAX_GRID_SAMPLES]]]
        labels += [_label(f"{names[0]}: {prompt}"), _label(f"{names[1]}: {prompt}")]
    n = max(len(r) for r in rows)
    return labelled_grid(rows, labels, path, scale=scale, column_labels=[f"s{i}" for i in range(n)])


def _figure(width: float = 5.0, height: float = 3.6):  # noqa: ANN202 - (Figure, Axes)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def score_histogram(scores: Mapping[str, np.ndarray], reward: str, path: str | os.PathLike) -> Path:
    """Histogram of per-image ``reward`` scores, one (overlaid) per model."""
    fig, ax = _figure()
    values = np.concatenate([np.asarray(v, np.float64) for v in scores.values()])
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo - 0.5, hi + 0.5, 12) if lo == hi else np.linspace(lo, hi, 21)
    for name, v in scores.items():
        ax.hist(v, bins=bins, alpha=0.55, label=f"{name} (mean {np.mean(v):.3f})")
    ax.set_xlabel(reward)
    ax.set_ylabel("images")
    ax.set_title(f"{reward}: per-image scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def prompt_scatter(
    means_a: np.ndarray, means_b: np.ndarray, names: Sequence[str], reward: str, path: str | os.PathLike
) -> Path:
    """Per-prompt mean score of A (x) against B (y), with the diagonal: points below it are prompts A wins."""
    fig, ax = _figure(4.2, 4.0)
    ax.scatter(means_a, means_b, s=18, alpha=0.8)
    both = np.concatenate([means_a, means_b])
    lo, hi = float(both.min()), float(both.max())
    pad = 0.05 * (hi - lo) or 0.5
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", linewidth=1, linestyle="--")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(f"{names[0]}: mean {reward} per prompt")
    ax.set_ylabel(f"{names[1]}: mean {reward} per prompt")
    ax.set_title(f"{reward}: per-prompt means")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def win_rate_bars(win_rates: Mapping[str, WinRate], names: Sequence[str], path: str | os.PathLike) -> Path:
    """Win rate of A over B per reward, with its bootstrap interval; the 0.5 line is a draw."""
    fig, ax = _figure(max(3.5, 1.2 * len(win_rates) + 1.5), 3.4)
    labels = list(win_rates)
    estimates = np.array([w.estimate for w in win_rates.values()])
    lows = np.array([w.estimate if w.low is None else w.low for w in win_rates.values()])
    highs = np.array([w.estimate if w.high is None else w.high for w in win_rates.values()])
    x = np.arange(len(labels))
    ax.bar(x, estimates, color="tab:blue", alpha=0.7)
    ax.errorbar(x, estimates, yerr=[estimates - lows, highs - estimates], fmt="none", ecolor="black", capsize=4)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate of {names[0]} over {names[1]}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
