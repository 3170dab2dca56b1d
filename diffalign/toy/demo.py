"""``diffalign demo``: the main job on the embedded toy world.

Pretrained base (committed weights, or pretrained here if absent) → Diffusion-DPO on colour-preference pairs →
colour adherence of generated samples before and after, a before/after image grid and ``report.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from diffalign.eval.grid import labelled_grid
from diffalign.toy.experiment import check_overrides, evaluate, first_per_prompt, prepare_world, train_method
from diffalign.toy.world import all_prompts


def run_demo(
    output_dir: str | os.PathLike = "outputs/demo",
    *,
    n_per_prompt: int = 16,
    overrides: Sequence[str] = (),
) -> dict:
    check_overrides(["dpo"], overrides)
    started = time.perf_counter()
    output_dir = Path(output_dir)
    world = prepare_world(output_dir)
    prepared = time.perf_counter()
    before = evaluate(world.base, n_per_prompt=n_per_prompt)
    run_dir, train_seconds = train_method("dpo", world, overrides)
    after = evaluate(world.base, run_dir, n_per_prompt=n_per_prompt)
    grid = labelled_grid(
        [first_per_prompt(before, 1), first_per_prompt(after, 1)],
        ["base", "Diffusion-DPO"],
        output_dir / "before_after.png",
        column_labels=[p.removeprefix("a ") for p in all_prompts()],
    )
    report = {
        "method": "dpo",
        "adherence_before": before.metrics["adherence"],
        "adherence_after": after.metrics["adherence"],
        "diversity_before": before.metrics["diversity"],
        "diversity_after": after.metrics["diversity"],
        "shape_adherence_before": before.metrics["shape_adherence"],
        "shape_adherence_after": after.metrics["shape_adherence"],
        "samples_per_evaluation": len(before.prompts),
        "seconds": time.perf_counter() - started,
        "seconds_prepare": prepared - started,
        "seconds_train": train_seconds,
        "base": str(world.base),
        "run_dir": str(run_dir),
        "grid": str(grid),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_demo_table(report))
    return report


def format_demo_table(report: dict) -> str:
    gain = 100 * (report["adherence_after"] - report["adherence_before"])
    before, after = report["adherence_before"], report["adherence_after"]
    return "\n".join(
        [
            f"| toy world, {report['samples_per_evaluation']} samples | before | after |",
            "|---|---|---|",
            f"| colour adherence | {before:.3f} | {after:.3f} ({gain:+.1f} pts) |",
            f"| shape adherence | {report['shape_adherence_before']:.3f} | {report['shape_adherence_after']:.3f} |",
            f"| diversity | {report['diversity_before']:.3f} | {report['diversity_after']:.3f} |",
            f"\ntotal {report['seconds']:.0f} s (training {report['seconds_train']:.0f} s); grid: {report['grid']}",
        ]
    )
