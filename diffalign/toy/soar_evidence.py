"""``diffalign evidence soar``: SOAR against SFT on the toy flow base — the same winners of the toy pairs, the same
steps and learning rate (``configs/toy/flow_sft.yaml`` / ``soar.yaml``), judged with

* ``gold``: colour adherence of generated samples (:func:`diffalign.toy.flow_experiment.evaluate_flow`: ODE, 20
  steps, CFG 3, 16 per prompt);
* ``trajectory_error`` / ``trajectory_error_final``: error of the model's clean estimates along its own ODE
  trajectory (:mod:`diffalign.eval.trajectory`), on held-out renderings of every prompt (correct colour and shape)
  started at 25 / 50 / 75 % of the 20-step schedule.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.eval.grid import labelled_grid
from diffalign.eval.trajectory import trajectory_error
from diffalign.eval.weights import load_trained_denoiser
from diffalign.models.loading import load_adapter
from diffalign.models.rollout import SamplerSettings
from diffalign.toy.experiment import check_overrides, first_per_prompt, train_method
from diffalign.toy.flow_experiment import evaluate_flow, prepare_flow_world
from diffalign.toy.reports import write_report
from diffalign.toy.world import RESOLUTION, all_prompts, parse_caption, render_batch, sample_specs
from diffalign.utils.randomness import per_sample_normal

SOAR_METHODS = {"sft": "flow_sft", "soar": "soar"}  # method -> configs/toy file
HELD_OUT_SEED = 777
TRAJECTORY_SETTINGS = SamplerSettings(kind="ode", steps=20, guidance_scale=3.0, noise_level=0.0, resolution=RESOLUTION)


def held_out_data(n_per_prompt: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(x0 in [-1, 1], noise, prompts)``: fresh correct renderings of every prompt (not in the training pairs)."""
    images, prompts = [], []
    for p, prompt in enumerate(all_prompts()):
        colour, shape = parse_caption(prompt)
        images.append(render_batch(sample_specs(n_per_prompt, HELD_OUT_SEED + p, colour=colour, shape=shape)))
        prompts += [prompt] * n_per_prompt
    x0 = torch.cat(images) * 2.0 - 1.0
    noise = per_sample_normal(tuple(x0.shape[1:]), HELD_OUT_SEED, 0, range(len(prompts)))
    return x0, noise, prompts


def trajectory_metrics(base: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict[str, float]:
    adapter = load_adapter(base, backbone="sd3", max_sequence_length=8)
    if run_dir is not None:
        adapter.denoiser = load_trained_denoiser(base, run_dir, "transformer")
    adapter.denoiser.eval()
    x0, noise, prompts = held_out_data()
    return trajectory_error(adapter, x0, noise, prompts, TRAJECTORY_SETTINGS)


def run_soar_evidence(
    output_dir: str | os.PathLike = "outputs/evidence/soar",
    *,
    methods: Sequence[str] | None = None,
    n_per_prompt: int = 16,
    overrides: Sequence[str] = (),
) -> dict:
    """Train ``methods`` (``sft``, ``soar``) from the flow base and judge them; write ``report.json`` /
    ``report.md`` / ``samples.png`` to ``output_dir``."""
    methods = tuple(methods or SOAR_METHODS)
    unknown = set(methods) - set(SOAR_METHODS)
    if unknown:
        raise ValueError(f"unknown soar methods {sorted(unknown)}; choose from {tuple(SOAR_METHODS)}")
    check_overrides([SOAR_METHODS[m] for m in methods], overrides)
    output_dir = Path(output_dir)
    world = prepare_flow_world(output_dir)
    before = evaluate_flow(world.base, n_per_prompt=n_per_prompt)
    traj_before = trajectory_metrics(world.base)
    report: dict = {
        "world": {"family": "soar", "base": str(world.base), "pairs": str(world.pairs)},
        "base": {"gold": before.metrics["adherence"], **traj_before},
        "methods": {},
    }
    rows, labels = [first_per_prompt(before, 1)], ["base"]
    for method in methods:
        run_dir, seconds = train_method(SOAR_METHODS[method], world, [*overrides])
        after = evaluate_flow(world.base, run_dir, n_per_prompt=n_per_prompt)
        traj = trajectory_metrics(world.base, run_dir)
        report["methods"][method] = {
            "gold_before": before.metrics["adherence"],
            "gold_after": after.metrics["adherence"],
            "shape_adherence_after": after.metrics["shape_adherence"],
            "diversity_after": after.metrics["diversity"],
            **{f"{k}_before": v for k, v in traj_before.items()},
            **{f"{k}_after": v for k, v in traj.items()},
            "seconds": seconds,
        }
        rows.append(first_per_prompt(after, 1))
        labels.append(method)
        write_report(output_dir, report, format_soar_report)
    report["checks"] = soar_checks(report)
    write_report(output_dir, report, format_soar_report)
    labelled_grid(rows, labels, output_dir / "samples.png", column_labels=[p.removeprefix("a ") for p in all_prompts()])
    return report


def soar_checks(report: dict) -> dict[str, bool | float]:
    m = report["methods"]
    if not {"sft", "soar"} <= set(m):
        return {}
    sft, soar = m["sft"], m["soar"]
    return {
        "soar_gold_minus_sft": soar["gold_after"] - sft["gold_after"],
        "soar_trajectory_error_vs_sft": soar["trajectory_error_after"] / sft["trajectory_error_after"],
        "soar_ok": soar["gold_after"] > sft["gold_after"]
        and soar["trajectory_error_after"] < sft["trajectory_error_after"],
    }


def format_soar_report(report: dict) -> str:
    base = report["base"]
    lines = [
        "Toy flow world: SOAR vs SFT on the same winners, same steps. gold = colour adherence (ODE, 20 steps, CFG 3); "
        "trajectory error = MSE of the clean estimate along the model's own ODE path from held-out renderings.",
        "",
        "| method | gold | shape | trajectory_error | trajectory_error_final | seconds |",
        "|---|---|---|---|---|---|",
        f"| base | {base['gold']:.3f} | - | {base['trajectory_error']:.4f} | "
        f"{base['trajectory_error_final']:.4f} | - |",
    ]
    for name, m in report["methods"].items():
        lines.append(
            f"| {name} | {m['gold_after']:.3f} | {m['shape_adherence_after']:.3f} | {m['trajectory_error_after']:.4f} "
            f"| {m['trajectory_error_final_after']:.4f} | {m['seconds']:.0f} |"
        )
    if report.get("checks"):
        lines += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in report["checks"].items())]
    return "\n".join(lines) + "\n"
