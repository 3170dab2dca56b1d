"""``diffalign evidence NAME --seeds N``: one evidence run per training seed, and the report of their mean.

Each seed ``s`` runs the family with ``train.seed=s`` into ``OUTPUT/seed{s}/`` (the sampling seeds of the
evaluations stay fixed, so every run is judged on the same noise). The combined ``OUTPUT/report.json`` holds the
per-seed mean of every number (lists element by element, so trajectories average budget by budget), with
``"seeds": {"seeds": [...], "min": ..., "max": ..., "checks": [...]}`` beside it: the same tree of numbers at its
minimum and maximum over seeds, and each seed's own acceptance checks. The family's checks are computed again on the
means (``report["checks"]``), which is what the tables report.

``diffalign evidence NAME --merge DIR,DIR,...`` (:func:`merge_seed_reports`) builds the same mean report from runs
made separately, one seed each (``train.seed=s``, on several machines or at several times).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from diffalign.errors import DiffalignError
from diffalign.toy.reports import write_report


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def combine(values: Sequence[Any], reduce: Callable[[list[float]], float], path: str = "report") -> Any:
    """``values`` (one report tree per seed, the same shape) with every number replaced by ``reduce`` of its values
    over seeds; a non-number leaf keeps the first seed's value, and ``None`` where a number is missing in a seed.

    Raises ``ValueError`` naming ``path`` when the trees differ in keys or list lengths."""
    first = values[0]
    if all(_is_number(v) for v in values):  # equal in every seed (a step, a sample count): kept as it is
        return first if all(v == first for v in values) else reduce([float(v) for v in values])
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise ValueError(f"{path}: the seeds' reports have different keys; rerun them with the same arguments")
        return {k: combine([v[k] for v in values], reduce, f"{path}.{k}") for k in first}
    if isinstance(first, list):
        if any(not isinstance(v, list) or len(v) != len(first) for v in values):
            raise ValueError(f"{path}: the seeds' reports have lists of different lengths")
        return [combine([v[i] for v in values], reduce, f"{path}[{i}]") for i in range(len(first))]
    return None if any(_is_number(v) for v in values) else first


def numbers_only(tree: Any) -> Any:
    """``tree`` without its non-number leaves (the shape of the ``min`` / ``max`` trees)."""
    if isinstance(tree, dict):
        kept = {k: numbers_only(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v not in (None, {}, [])}
    if isinstance(tree, list):
        return [numbers_only(v) for v in tree]
    return tree if _is_number(tree) else None


def mean_report(reports: Sequence[dict], seeds: Sequence[int], checks: Callable[[dict], dict] | None = None) -> dict:
    """The report of the per-seed mean of ``reports`` (see the module docstring); ``checks`` recomputes the family's
    acceptance checks on the means."""
    per_seed_checks = [r.get("checks") for r in reports]
    stripped = [{k: v for k, v in r.items() if k != "checks"} for r in reports]
    report = combine(stripped, fmean)
    if checks is not None:
        report["checks"] = checks(report)
    report["seeds"] = {
        "seeds": list(seeds),
        "min": numbers_only(combine(stripped, min)),
        "max": numbers_only(combine(stripped, max)),
        "checks": per_seed_checks,
    }
    return report


def format_seed_ranges(report: dict) -> str:
    """A table of each method's scalar numbers that differ between seeds: mean over seeds, then min and max."""
    spread = report["seeds"]
    seeds = ", ".join(map(str, spread["seeds"]))
    lines = [
        f"\nMean of {len(spread['seeds'])} training seeds ({seeds}); the numbers that differ between them:",
        "",
        "| method | number | mean | min | max |",
        "|---|---|---|---|---|",
    ]
    for method, entry in report.get("methods", {}).items():
        for key, value in entry.items():
            low, high = spread["min"]["methods"][method].get(key), spread["max"]["methods"][method].get(key)
            if _is_number(value) and low != high:
                lines.append(f"| {method} | {key} | {value:.3f} | {low:.3f} | {high:.3f} |")
    return "\n".join(lines) + "\n"


def run_over_seeds(
    run: Callable[..., dict],
    output_dir: str | os.PathLike,
    seeds: Sequence[int],
    *,
    format_report: Callable[[dict], str],
    checks: Callable[[dict], dict] | None = None,
    overrides: Sequence[str] = (),
    **kwargs: Any,
) -> dict:
    """``run(OUTPUT/seed{s}, overrides=[*overrides, "train.seed=s"], **kwargs)`` for every seed, then the mean report
    (:func:`mean_report`) written to ``output_dir`` as ``report.json`` / ``report.md``; returns it."""
    if any(o.split("=", 1)[0] == "train.seed" for o in overrides):
        raise DiffalignError("--seeds sets train.seed for each run; drop the train.seed override")
    output_dir = Path(output_dir)
    reports = [run(output_dir / f"seed{s}", overrides=[*overrides, f"train.seed={s}"], **kwargs) for s in seeds]
    report = mean_report(reports, seeds, checks)
    write_report(output_dir, report, lambda r: format_report(r) + format_seed_ranges(r))
    return report


def run_seed(run_dir: Path) -> int:
    """The ``train.seed`` every training run under ``run_dir/runs/`` used; one seed per evidence run."""
    import yaml

    seeds = set()
    for config in sorted((run_dir / "runs").glob("*/config.yaml")):
        seeds.add(int((yaml.safe_load(config.read_text()) or {}).get("train", {}).get("seed", 0)))
    if len(seeds) != 1:
        found = "no runs/*/config.yaml" if not seeds else f"train.seed {sorted(seeds)}"
        raise DiffalignError(f"{run_dir}: found {found}; merge evidence runs that each trained one seed")
    return seeds.pop()


def merge_seed_reports(
    run_dirs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    format_report: Callable[[dict], str],
    checks: Callable[[dict], dict] | None = None,
) -> dict:
    """The mean report (:func:`mean_report`) of the evidence runs in ``run_dirs`` (each a ``report.json`` of one
    training seed, read from its run configs), written to ``output_dir``; returns it. Refuses a repeated seed, runs
    whose reports differ in shape, and an ``output_dir`` that already holds a report."""
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise DiffalignError("--merge: give at least two evidence run directories, comma-separated")
    output_dir = Path(output_dir)
    if (output_dir / "report.json").exists():
        raise DiffalignError(f"{output_dir / 'report.json'} exists; pick another --output-dir")
    reports, seeds = [], []
    for d in dirs:
        path = d / "report.json"
        if not path.is_file():
            raise DiffalignError(f"{path}: no evidence report there; pass the --output-dir of a finished run")
        reports.append(json.loads(path.read_text()))
        seeds.append(run_seed(d))
    if len(set(seeds)) != len(seeds):
        raise DiffalignError(f"--merge: training seeds {seeds} repeat; each run must have trained another seed")
    try:
        report = mean_report(reports, seeds, checks)
    except ValueError as err:
        raise DiffalignError(f"--merge: {err}") from None
    write_report(output_dir, report, lambda r: format_report(r) + format_seed_ranges(r))
    return report
