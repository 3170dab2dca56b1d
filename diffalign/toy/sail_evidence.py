"""``diffalign evidence sail``: SAIL against Diffusion-DPO on the toy UNet world.

The pairs are human-like: a quarter of the labels are flipped (``LABEL_NOISE``; annotators disagree on real
preference data, and with clean toy labels 120 pairs already teach everything 2000 do, measured).

* ``dpo_seed``: Diffusion-DPO (``configs/toy/dpo.yaml``) on the first 6 % of the toy pairs (120 of 2000);
* ``dpo_full``: the same on all 2000 pairs;
* ``sail``: ``configs/toy/sail.yaml`` — round 0 is ``dpo_seed``'s run, then self-generated rounds.

Gold = colour adherence of generated samples with the UNet world's evaluation sampler
(:func:`diffalign.toy.experiment.evaluate`); SAIL is also evaluated after every round.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from diffalign.toy.experiment import (
    check_overrides,
    evaluate,
    first_per_prompt,
    prepare_world,
    train_method,
)
from diffalign.toy.reports import chosen_methods, finish_report, format_checks, write_report
from diffalign.trainers.sail import sail_rounds

SAIL_METHODS = ("dpo_seed", "dpo_full", "sail")
SEED_PAIRS = 120  # 6 % of the 2000 toy pairs
LABEL_NOISE = 0.25


def _run(method: str, world, overrides: Sequence[str]) -> tuple[Path, float]:
    if method == "dpo_seed":
        return train_method("dpo", world, [f"data.max_samples={SEED_PAIRS}", *overrides, _out(world, method)])
    if method == "dpo_full":
        return train_method("dpo", world, [*overrides, _out(world, method)])
    config_dir = Path(__file__).resolve().parents[2] / "configs" / "toy"
    run_dir, seconds = train_method(
        "sail", world, [f"sail.prompts={config_dir / 'prompts.txt'}", *overrides, _out(world, method)]
    )
    return Path((run_dir / "final_model.txt").read_text().strip()), seconds


def _out(world, method: str) -> str:
    return f"train.output_dir={world.workdir / 'runs' / method}"


def run_sail_evidence(
    output_dir: str | os.PathLike = "outputs/evidence/sail",
    *,
    methods: Sequence[str] | None = None,
    n_per_prompt: int = 16,
    overrides: Sequence[str] = (),
) -> dict:
    """Train and judge ``methods``; write ``report.json`` / ``report.md`` / ``samples.png`` to ``output_dir``."""
    methods = chosen_methods(methods, tuple(SAIL_METHODS), "sail")
    check_overrides(["dpo", "sail"], overrides)
    output_dir = Path(output_dir)
    world = prepare_world(output_dir, label_noise=LABEL_NOISE)
    before = evaluate(world.base, n_per_prompt=n_per_prompt)
    report: dict = {
        "world": {
            "family": "sail",
            "base": str(world.base),
            "pairs": str(world.pairs),
            "seed_pairs": SEED_PAIRS,
            "label_noise": LABEL_NOISE,
        },
        "base": {"gold": before.metrics["adherence"]},
        "methods": {},
    }
    rows, labels = [first_per_prompt(before, 1)], ["base"]
    for method in methods:
        model_dir, seconds = _run(method, world, overrides)
        after = evaluate(world.base, model_dir, n_per_prompt=n_per_prompt)
        entry = {
            "gold_before": before.metrics["adherence"],
            "gold_after": after.metrics["adherence"],
            "shape_adherence_after": after.metrics["shape_adherence"],
            "diversity_after": after.metrics["diversity"],
            "seconds": seconds,
        }
        if method == "sail":
            run_dir = world.workdir / "runs" / "sail"
            entry["rounds"] = [
                {
                    **r,
                    "gold": evaluate(
                        world.base, run_dir / f"round_{r['round']}" / "model", n_per_prompt=n_per_prompt
                    ).metrics["adherence"],
                }
                for r in sail_rounds(run_dir)
            ]
        report["methods"][method] = entry
        rows.append(first_per_prompt(after, 1))
        labels.append(method)
        write_report(output_dir, report, format_sail_report)
    return finish_report(output_dir, report, format_sail_report, sail_checks, rows, labels)


def sail_checks(report: dict) -> dict[str, float | bool]:
    m = report["methods"]
    if not set(SAIL_METHODS) <= set(m):
        return {}
    sail, seed, full = (m[k]["gold_after"] for k in ("sail", "dpo_seed", "dpo_full"))
    return {
        "sail_minus_dpo_seed": sail - seed,
        "dpo_full_minus_sail": full - sail,
        "sail_ok": sail > seed and full - sail <= 0.05,
    }


def format_sail_report(report: dict) -> str:
    lines = [
        f"Toy UNet world: Diffusion-DPO on {report['world']['seed_pairs']} seed pairs (6 %) or all pairs, and SAIL "
        f"from the seed pairs; {report['world']['label_noise']:.0%} of the labels flipped (human-like). gold = colour "
        "adherence of generated samples.",
        "",
        "| method | gold | shape | diversity | seconds |",
        "|---|---|---|---|---|",
        f"| base | {report['base']['gold']:.3f} | - | - | - |",
    ]
    for name, m in report["methods"].items():
        lines.append(
            f"| {name} | {m['gold_after']:.3f} | {m['shape_adherence_after']:.3f} | {m['diversity_after']:.3f} | "
            f"{m['seconds']:.0f} |"
        )
    for r in report["methods"].get("sail", {}).get("rounds", []):
        judge = f", judge margin {r['mean_margin']:.2f}, confident {r['confident_fraction']:.2f}" if r["round"] else ""
        lines.append(f"\nSAIL round {r['round']}: gold {r['gold']:.3f}{judge}")
    lines += format_checks(report.get("checks"))
    return "\n".join(lines) + "\n"
