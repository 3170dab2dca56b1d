"""``diffalign evidence offline`` / ``flow``: every method of a family trained from the same base with the same
budget, judged on generated samples with the pixel-level gold metric (colour adherence) and the diversity metric.

* ``offline``: the UNet base; gold with the evaluation sampler (DDIM ``eta = 1``) and, as a robustness column, with
  deterministic DDIM (``eta = 0``, keys ``gold_*_eta0``) on the same noise (see :mod:`diffalign.toy.sampling`).
* ``flow``: the SD3-style flow base (:mod:`diffalign.toy.flow_experiment`); gold with the Euler ODE and, as the
  robustness column, with the Flow-GRPO SDE (keys ``gold_*_sde``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffalign.toy.experiment import (
    Evaluation,
    ToyWorld,
    check_overrides,
    evaluate,
    first_per_prompt,
    prepare_world,
    train_method,
)
from diffalign.toy.reports import finish_report, format_checks, write_report

OFFLINE_METHODS = ("dpo", "mapo", "dcpo", "rpo", "sft")
GOLD_GAIN = 0.20  # the acceptance criterion: each preference method raises gold by >= 20 points under both samplers


@dataclass(frozen=True)
class EvidenceFamily:
    """What differs between families: the methods, the world, and the main and alternative evaluation samplers."""

    methods: tuple[str, ...]
    prepare: Callable[..., ToyWorld]  # (workdir, *, kind: the pair kind)
    evaluate: Callable[..., Evaluation]  # (base, run_dir=None, *, n_per_prompt, alternative: bool)
    alternative_key: str  # suffix of the gold keys measured with the alternative sampler
    alternative_label: str


def _offline_evaluate(base, run_dir=None, *, n_per_prompt: int, alternative: bool = False) -> Evaluation:
    return evaluate(base, run_dir, n_per_prompt=n_per_prompt, **({"eta": 0.0} if alternative else {}))


def _flow_prepare(workdir: Path, *, kind: str) -> ToyWorld:
    from diffalign.toy.flow_experiment import prepare_flow_world

    return prepare_flow_world(workdir, kind=kind)


def _flow_evaluate(base, run_dir=None, *, n_per_prompt: int, alternative: bool = False) -> Evaluation:
    from diffalign.toy.flow_experiment import ALTERNATIVE_NOISE_LEVEL, evaluate_flow

    return evaluate_flow(
        base, run_dir, n_per_prompt=n_per_prompt, **({"noise_level": ALTERNATIVE_NOISE_LEVEL} if alternative else {})
    )


FAMILIES = {
    "offline": EvidenceFamily(OFFLINE_METHODS, prepare_world, _offline_evaluate, "eta0", "DDIM η=0"),
    "flow": EvidenceFamily(("flow_dpo", "flow_rpo", "flow_sft"), _flow_prepare, _flow_evaluate, "sde", "SDE a=0.7"),
}


def run_evidence(
    family: str,
    output_dir: str | os.PathLike | None = None,
    *,
    methods: Sequence[str] | None = None,
    n_per_prompt: int = 16,
    overrides: Sequence[str] = (),
    pairs: str = "colour",
) -> dict:
    """Train and judge ``methods`` (default: all of ``family``) on the toy pairs of kind ``pairs``
    (:data:`~diffalign.toy.pairs.PAIR_KINDS`); write ``report.json``, ``report.md`` and a grid of samples (one per
    prompt and method) to ``output_dir`` and return the report."""
    spec = FAMILIES[family]
    methods = tuple(methods or spec.methods)
    check_overrides(methods, overrides)
    output_dir = Path(output_dir or f"outputs/evidence/{family}")
    world = spec.prepare(output_dir, kind=pairs)
    before = spec.evaluate(world.base, n_per_prompt=n_per_prompt)
    before_alt = spec.evaluate(world.base, n_per_prompt=n_per_prompt, alternative=True)
    alt = spec.alternative_key
    report: dict = {
        "world": {
            "family": family,
            "base": str(world.base),
            "pairs": str(world.pairs),
            "pair_kind": pairs,
            "samples_per_evaluation": len(before.prompts),
            "alternative_sampler": spec.alternative_label,
            "alternative_key": alt,
        },
        "methods": {},
    }
    rows, labels = [first_per_prompt(before, 1)], ["base"]
    for method in methods:
        run_dir, seconds = train_method(method, world, overrides)
        after = spec.evaluate(world.base, run_dir, n_per_prompt=n_per_prompt)
        after_alt = spec.evaluate(world.base, run_dir, n_per_prompt=n_per_prompt, alternative=True)
        report["methods"][method] = {
            "gold_before": before.metrics["adherence"],
            "gold_after": after.metrics["adherence"],
            "diversity_before": before.metrics["diversity"],
            "diversity_after": after.metrics["diversity"],
            "shape_adherence_after": after.metrics["shape_adherence"],
            "checkerboard_before": before.metrics["checkerboard"],
            "checkerboard_after": after.metrics["checkerboard"],
            f"gold_before_{alt}": before_alt.metrics["adherence"],
            f"gold_after_{alt}": after_alt.metrics["adherence"],
            "seconds": seconds,
        }
        rows.append(first_per_prompt(after, 1))
        labels.append(method)
        write_report(output_dir, report, format_report)
    return finish_report(output_dir, report, format_report, gain_checks, rows, labels)


def gain_checks(report: dict) -> dict:
    """Per method, the gold gain in points under the evaluation sampler (``{m}_gain_pts``) and the alternative one
    (``{m}_gain_pts_{alt}``); ``gain_20_pts_under_both``: the methods that gain >= 20 points under both."""
    alt = report["world"]["alternative_key"]
    out: dict = {}
    for name, m in report["methods"].items():
        out[f"{name}_gain_pts"] = 100 * (m["gold_after"] - m["gold_before"])
        out[f"{name}_gain_pts_{alt}"] = 100 * (m[f"gold_after_{alt}"] - m[f"gold_before_{alt}"])
    out["gain_20_pts_under_both"] = [
        name
        for name in report["methods"]
        if min(out[f"{name}_gain_pts"], out[f"{name}_gain_pts_{alt}"]) >= 100 * GOLD_GAIN - 1e-9
    ]
    return out


def run_offline_evidence(output_dir: str | os.PathLike = "outputs/evidence/offline", **kwargs) -> dict:
    """:func:`run_evidence` for the ``offline`` family."""
    return run_evidence("offline", output_dir, **kwargs)


def run_flow_evidence(output_dir: str | os.PathLike = "outputs/evidence/flow", **kwargs) -> dict:
    """:func:`run_evidence` for the ``flow`` family."""
    return run_evidence("flow", output_dir, **kwargs)


def format_report(report: dict) -> str:
    world = report["world"]
    alt, label = world["alternative_key"], world["alternative_sampler"]
    lines = [
        f"Toy world ({world['family']}), {world['pair_kind']} pairs, {world['samples_per_evaluation']} generated "
        "samples per evaluation (gold = colour adherence).",
        "",
        "| method | gold before | gold after | change | diversity before | diversity after | gold after, "
        f"{label} (before) | checkerboard (before) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        change = 100 * (m["gold_after"] - m["gold_before"])
        lines.append(
            f"| {name} | {m['gold_before']:.3f} | {m['gold_after']:.3f} | {change:+.1f} pts | "
            f"{m['diversity_before']:.3f} | {m['diversity_after']:.3f} | "
            f"{m[f'gold_after_{alt}']:.3f} ({m[f'gold_before_{alt}']:.3f}) | "
            f"{m['checkerboard_after']:.4f} ({m['checkerboard_before']:.4f}) | {m['seconds']:.0f} |"
        )
    lines += format_checks(report.get("checks"))
    return "\n".join(lines) + "\n"
