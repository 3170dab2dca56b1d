"""Where every ``diffalign evidence`` family writes its report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def chosen_methods(methods: Sequence[str] | None, known: Sequence[str], family: str) -> tuple[str, ...]:
    """``methods`` (all of ``known`` when None or empty); an unknown name is a one-line error naming the choices."""
    chosen = tuple(methods or known)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"unknown {family} methods {unknown}; choose from {', '.join(known)}")
    return chosen


def write_report(output_dir: str | os.PathLike, report: dict, format_report: Callable[[dict], str]) -> None:
    """``report.json`` and ``report.md`` (``format_report(report)``) of an evidence run, in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(format_report(report))


def format_checks(checks: dict | None) -> list[str]:
    """The report lines of a family's acceptance checks (none when there are none): ``Checks: k = v, ...`` with
    floats at 3 decimals, lists and nested dicts written out."""
    if not checks:
        return []
    return ["", "Checks: " + ", ".join(f"{k} = {_check_value(v)}" for k, v in checks.items())]


def _check_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_check_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_check_value(v) for v in value) + "]"
    return str(value)


def write_samples_grid(output_dir: str | os.PathLike, rows: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """``samples.png``: one labelled row per model (its first sample of every toy prompt), a column per prompt."""
    from diffalign.eval.grid import labelled_grid
    from diffalign.toy.world import all_prompts

    columns = [p.removeprefix("a ") for p in all_prompts()]
    labelled_grid(rows, labels, Path(output_dir) / "samples.png", column_labels=columns)


def finish_report(
    output_dir: str | os.PathLike,
    report: dict,
    format_report: Callable[[dict], str],
    checks: Callable[[dict], dict],
    rows: Sequence[torch.Tensor],
    labels: Sequence[str],
) -> dict:
    """The end of an evidence run: ``report["checks"] = checks(report)``, then the final ``report.json`` /
    ``report.md`` (:func:`write_report`) and ``samples.png`` (:func:`write_samples_grid`); returns ``report``."""
    report["checks"] = checks(report)
    write_report(output_dir, report, format_report)
    write_samples_grid(output_dir, rows, labels)
    return report
