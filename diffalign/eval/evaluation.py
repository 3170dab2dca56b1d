"""Evaluate one folder of generated images, or compare two (model A vs model B on the same prompts and seeds).

:func:`evaluate_folders` loads the folders (:mod:`diffalign.eval.folders`), scores every image with the requested
rewards and measures diversity per prompt (:mod:`diffalign.eval.scoring`), computes A's win rate over B per reward
with a bootstrap interval (:mod:`diffalign.eval.winrate`), and writes into ``output_dir``:

* ``scores.csv`` (one row per image), ``per_prompt.csv``, ``summary.json``, ``report.md``;
* ``grid_A.png`` / ``grid_B.png`` (prompts × samples), ``grid_A_vs_B.png``; ``hist_<reward>.png`` (scores per
  model), ``scatter_<reward>.png`` (per-prompt means, A vs B) and ``win_rates.png``.

Without ``rewards``, a prompt set claimed by a prompt scorer (:class:`~diffalign.eval.scoring.PromptScorer`) is
scored with that scorer's default rewards (the toy world's plugin: ``toy_gold``); others get diversity metrics only.

Out of scope: a GenEval-style prompt set (object counts, colours, positions) with its object-detector checker — no
detector can be loaded from local files here; the toy world's gold metric (its plugin, ``diffalign.toy.metrics``)
plays that role for the toy world.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffalign.eval import plots
from diffalign.eval.folders import ImageFolder, check_paired, load_image_folder
from diffalign.eval.report import per_prompt_rows, summary_dict, write_report_md, write_rows_csv, write_scores_csv
from diffalign.eval.scoring import FolderScores, build_eval_rewards, claiming_scorers, score_folder
from diffalign.eval.winrate import WinRate, win_rate


def default_rewards(folder: ImageFolder) -> list[str]:
    """The default rewards of the prompt scorers that claim ``folder``, in order, without repeats."""
    names: list[str] = []
    for scorer in claiming_scorers(folder.prompts, folder.images):
        names += [n for n in scorer.default_rewards if n not in names]
    return names


def evaluate_folders(
    images: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    images_b: str | os.PathLike | None = None,
    rewards: Sequence[str] | None = None,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    n_bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    confidence: float = 0.95,
    batch_size: int = 64,
    device: str = "cpu",
    figures: bool = True,
) -> dict[str, Any]:
    """Evaluate ``images`` (and compare with ``images_b``); returns the ``summary.json`` content plus the paths
    written (``"files"``)."""
    folders = {"A": load_image_folder(images)}
    warnings: list[str] = []
    if images_b is not None:
        folders["B"] = load_image_folder(images_b)
        warnings = check_paired(folders["A"], folders["B"])
    names = list(rewards) if rewards is not None else default_rewards(folders["A"])
    models = build_eval_rewards(names, reward_options, device=device)
    results: dict[str, FolderScores] = {
        label: score_folder(folder, models, batch_size=batch_size, device=device) for label, folder in folders.items()
    }
    win_rates: dict[str, WinRate] = {}
    if images_b is not None:
        prompt_ids = [p for p, _ in folders["A"].keys]
        for name in names:
            win_rates[name] = win_rate(
                results["A"].scores[name],
                results["B"].scores[name],
                prompt_ids,
                n_resamples=n_bootstrap,
                seed=bootstrap_seed,
                confidence=confidence,
            )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "images": str(images),
        "images_b": None if images_b is None else str(images_b),
        "rewards": names,
        "reward_options": dict(reward_options or {}),
        "bootstrap": n_bootstrap,
        "bootstrap_seed": bootstrap_seed,
        "confidence": confidence,
    }
    written = [
        write_scores_csv(results, out / "scores.csv"),
        write_rows_csv(per_prompt_rows(results, win_rates), out / "per_prompt.csv"),
    ]
    figs: list[Path] = []
    if figures:
        labels = list(folders)
        for label, folder in folders.items():
            figs.append(plots.folder_grid(folder, out / f"grid_{label}.png"))
        if images_b is not None:
            figs.append(plots.comparison_grid(folders["A"], folders["B"], labels, out / "grid_A_vs_B.png"))
        for name in names:
            figs.append(plots.score_histogram({k: r.scores[name] for k, r in results.items()}, name,
                                              out / f"hist_{name}.png"))  # fmt: skip
            if images_b is not None:
                means = [np.array([row[f"mean_{name}"] for row in results[k].per_prompt]) for k in labels]
                figs.append(plots.prompt_scatter(means[0], means[1], labels, name, out / f"scatter_{name}.png"))
        if win_rates:
            figs.append(plots.win_rate_bars(win_rates, labels, out / "win_rates.png"))
    summary = summary_dict(results, win_rates, settings)
    summary["warnings"] = warnings
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    written.append(out / "summary.json")
    written.append(write_report_md(results, win_rates, settings, figs, out / "report.md", warnings))
    summary["files"] = [str(p) for p in [*written, *figs]]
    return summary
