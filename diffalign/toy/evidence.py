"""``diffalign evidence offline``: every offline method trained from the same base with the same budget, judged on
generated samples with the pixel-level gold metric (colour adherence) and the diversity metric.

Gold is measured with the evaluation sampler (``eta = 1``) and, as a robustness column, with the deterministic DDIM
sampler (``eta = 0``, keys ``gold_*_eta0``) on the same noise; see :mod:`diffalign.toy.sampling` for why they differ."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from diffalign.eval.grid import labelled_grid
from diffalign.toy.experiment import check_overrides, evaluate, first_per_prompt, prepare_world, train_method
from diffalign.toy.world import all_prompts

OFFLINE_METHODS = ("dpo", "mapo", "dcpo", "sft")


def run_offline_evidence(
    output_dir: str | os.PathLike = "outputs/evidence/offline",
    *,
    methods: Sequence[str] = OFFLINE_METHODS,
    n_per_prompt: int = 16,
    overrides: Sequence[str] = (),
) -> dict:
    check_overrides(methods, overrides)
    output_dir = Path(output_dir)
    world = prepare_world(output_dir)
    before = evaluate(world.base, n_per_prompt=n_per_prompt)
    before_eta0 = evaluate(world.base, n_per_prompt=n_per_prompt, eta=0.0)
    report: dict = {
        "world": {"base": str(world.base), "pairs": str(world.pairs), "samples_per_evaluation": len(before.prompts)},
        "methods": {},
    }
    rows, labels = [first_per_prompt(before, 1)], ["base"]
    for method in methods:
        run_dir, seconds = train_method(method, world, overrides)
        after = evaluate(world.base, run_dir, n_per_prompt=n_per_prompt)
        after_eta0 = evaluate(world.base, run_dir, n_per_prompt=n_per_prompt, eta=0.0)
        report["methods"][method] = {
            "gold_before": before.metrics["adherence"],
            "gold_after": after.metrics["adherence"],
            "diversity_before": before.metrics["diversity"],
            "diversity_after": after.metrics["diversity"],
            "shape_adherence_after": after.metrics["shape_adherence"],
            "gold_before_eta0": before_eta0.metrics["adherence"],
            "gold_after_eta0": after_eta0.metrics["adherence"],
            "seconds": seconds,
        }
        rows.append(first_per_prompt(after, 1))
        labels.append(method)
        _write(output_dir, report)
    labelled_grid(rows, labels, output_dir / "samples.png", column_labels=[p.removeprefix("a ") for p in all_prompts()])
    return report


def _write(output_dir: Path, report: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(format_report(report))


def format_report(report: dict) -> str:
    n = report["world"]["samples_per_evaluation"]
    lines = [
        f"Toy world, {n} generated samples per evaluation (gold = colour adherence).",
        "",
        "| method | gold before | gold after | change | diversity before | diversity after | gold after, DDIM η=0 "
        "(before) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        change = 100 * (m["gold_after"] - m["gold_before"])
        lines.append(
            f"| {name} | {m['gold_before']:.3f} | {m['gold_after']:.3f} | {change:+.1f} pts | "
            f"{m['diversity_before']:.3f} | {m['diversity_after']:.3f} | "
            f"{m['gold_after_eta0']:.3f} ({m['gold_before_eta0']:.3f}) | {m['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
