"""Tables of an evaluation: ``scores.csv`` (one row per image), ``per_prompt.csv``, ``summary.json`` and the
human-readable ``report.md`` (Markdown tables, links to the figures)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffalign.eval.scoring import FolderScores, get_prompt_scorer
from diffalign.eval.winrate import WinRate


def write_scores_csv(results: Mapping[str, FolderScores], path: str | os.PathLike) -> Path:
    """One row per image: ``model`` (A / B), ``folder``, ``file``, ``prompt_index``, ``sample_index``, ``seed``,
    ``prompt``, then one column per reward (full float precision)."""
    rewards = list(next(iter(results.values())).scores)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "folder", "file", "prompt_index", "sample_index", "seed", "prompt", *rewards])
        for label, result in results.items():
            for row, entry in enumerate(result.folder.entries):
                writer.writerow(
                    [label, str(result.folder.path), entry["file"], entry["prompt_index"], entry["sample_index"],
                     entry.get("seed", ""), entry["prompt"], *(float(result.scores[r][row]) for r in rewards)]
                )  # fmt: skip
    return path


def per_prompt_rows(
    results: Mapping[str, FolderScores], win_rates: Mapping[str, WinRate] | None = None
) -> list[dict[str, Any]]:
    """One row per prompt: each model's mean scores and diversity (columns prefixed ``A_`` / ``B_``) and, for a
    pair, each reward's per-prompt win rate of A over B."""
    rows: dict[int, dict[str, Any]] = {}
    for label, result in results.items():
        for item in result.per_prompt:
            row = rows.setdefault(
                item["prompt_index"], {"prompt_index": item["prompt_index"], "prompt": item["prompt"]}
            )
            row.update({f"{label}_{k}": v for k, v in item.items() if k not in ("prompt_index", "prompt")})
    ordered = [rows[p] for p in sorted(rows)]
    for reward, wr in (win_rates or {}).items():
        for row, value in zip(ordered, wr.per_prompt, strict=True):
            row[f"win_rate_{reward}"] = float(value)
    return ordered


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def summary_dict(
    results: Mapping[str, FolderScores],
    win_rates: Mapping[str, WinRate] | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": dict(settings), "models": {}}
    for label, r in results.items():
        out["models"][label] = {
            "folder": str(r.folder.path),
            "images": len(r.folder.entries),
            "prompts": len(r.per_prompt),
            "generation": r.folder.generation,
            "scores": {k: {"mean": float(v.mean()), "std": float(v.std())} for k, v in r.scores.items()},
            "diversity": r.diversity,
            **r.extra,
        }
    if win_rates:
        out["win_rates"] = {
            k: {"estimate": w.estimate, "low": w.low, "high": w.high, "wins": w.wins, "ties": w.ties,
                "losses": w.losses, "prompts": w.n_prompts}
            for k, w in win_rates.items()
        }  # fmt: skip
    return out


def _pair(values: Sequence[Any]) -> str:
    return " / ".join(_fmt(v) for v in values)


def _per_prompt_tables(
    results: Mapping[str, FolderScores],
    win_rates: Mapping[str, WinRate] | None,
    labels: Sequence[str],
    rewards: Sequence[str],
    metrics: Sequence[str],
) -> list[str]:
    """Per-prompt mean scores (``A / B`` cells, win rates) and per-prompt diversity; all columns in per_prompt.csv."""
    table = per_prompt_rows(results, win_rates)
    lines: list[str] = []
    who = " / ".join(labels)
    if rewards:
        lines += [f"## Per prompt: mean score ({who}){' and win rate' if win_rates else ''}", ""]
        header = ["prompt", *rewards, *(f"win rate {r}" for r in (win_rates or {}))]
        rows = [
            [row["prompt"], *(_pair([row.get(f"{m}_mean_{r}") for m in labels]) for r in rewards),
             *(row.get(f"win_rate_{r}") for r in (win_rates or {}))]
            for row in table
        ]  # fmt: skip
        lines += _table(header, rows)
    if metrics:
        lines += [f"## Per prompt: diversity ({who})", ""]
        rows = [[row["prompt"], *(_pair([row.get(f"{m}_{x}") for m in labels]) for x in metrics)] for row in table]
        lines += _table(["prompt", *metrics], rows)
    return lines


def _scorer_tables(results: Mapping[str, FolderScores], labels: Sequence[str]) -> list[str]:
    """A table per prompt scorer whose summary every model has (e.g. the toy world's gold metrics)."""
    lines: list[str] = []
    first = next(iter(results.values()))
    for name in first.extra:
        if not all(r.extra.get(name) for r in results.values()):
            continue
        lines += [f"## {get_prompt_scorer(name).title or name}", ""]
        keys = list(first.extra[name])
        lines += _table(["metric", *labels], [[k, *(results[x].extra[name][k] for x in labels)] for k in keys])
    return lines


def write_report_md(
    results: Mapping[str, FolderScores],
    win_rates: Mapping[str, WinRate] | None,
    settings: Mapping[str, Any],
    figures: Sequence[Path],
    path: str | os.PathLike,
    warnings: Sequence[str] = (),
) -> Path:
    labels = list(results)
    lines = ["# Image evaluation report", ""]
    for label, r in results.items():
        gen = r.folder.generation or {}
        how = ", ".join(f"{k} {gen[k]}" for k in ("sampler", "steps", "guidance_scale", "seed") if k in gen)
        model = f"; model `{gen['model']}`" if "model" in gen else ""
        weights = f" + weights `{gen['weights']}`" if gen.get("weights") else ""
        lines.append(
            f"- **{label}**: `{r.folder.path}` — {len(r.folder.entries)} images, {len(r.per_prompt)} prompts"
            f"{model}{weights}{f' ({how})' if how else ''}"
        )
    rewards = list(next(iter(results.values())).scores)
    lines.append(f"- rewards: {', '.join(rewards) if rewards else 'none (diversity only)'}")
    if settings.get("reward_options"):
        lines.append(f"- reward options: `{json.dumps(settings['reward_options'])}`")
    lines += [f"- warning: {w}" for w in warnings]
    lines.append("")
    if rewards:
        lines += ["## Mean scores (± std over images)", ""]
        rows = [[k, *(f"{results[m].scores[k].mean():.4f} ± {results[m].scores[k].std():.4f}" for m in labels)]
                for k in rewards]  # fmt: skip
        lines += _table(["reward", *labels], rows)
    if win_rates:
        wr0 = next(iter(win_rates.values()))
        lines += [f"## Win rate of {labels[0]} over {labels[1]}", ""]
        lines.append(
            f"Per prompt, the fraction of samples (same prompt, same sample index) where {labels[0]} scores higher "
            f"(ties count 1/2), averaged over prompts. Interval: {int(wr0.confidence * 100)}% percentile bootstrap, "
            f"{wr0.n_resamples} resamples of the prompts (seed {wr0.seed})."
            if wr0.n_resamples
            else "No bootstrap interval (--bootstrap 0)."
        )
        lines.append("")
        rows = [
            [k, w.estimate, "–" if w.low is None else f"[{w.low:.4f}, {w.high:.4f}]", f"{w.wins}/{w.ties}/{w.losses}",
             w.n_prompts]
            for k, w in win_rates.items()
        ]  # fmt: skip
        lines += _table(["reward", "win rate", "interval", "wins/ties/losses", "prompts"], rows)
    metrics: list[str] = []
    for r in results.values():
        metrics += [m for m in r.diversity if m not in metrics]
    if metrics:
        lines += ["## Diversity (mean over prompts with ≥ 2 images; higher = more diverse)", ""]
        lines += _table(["metric", *labels], [[m, *(results[x].diversity.get(m) for x in labels)] for m in metrics])
    lines += _scorer_tables(results, labels)
    lines += _per_prompt_tables(results, win_rates, labels, rewards, metrics)
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{fig.stem}]({fig.name})" for fig in figures]
        lines.append("")
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
