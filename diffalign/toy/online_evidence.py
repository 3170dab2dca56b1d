"""``diffalign evidence online``: online RL on the toy flow base against the learned, brightness-biased toy reward
model (the *proxy*), judged with the pixel-level gold metric (colour adherence) and diversity metrics.

Methods (each from the same base with its ``configs/toy`` file):

* ``flow_grpo`` — Flow-GRPO (PPO clip on the SDE step ratio); ``grpo_guard`` — the same with GRPO-Guard's regulated
  clipping.
* ``direct_reward`` — direct reward back-propagation with the plain proxy (the uncorrected baseline);
  ``d2_align`` — stage 1 learns D²-Align's ``b_v`` with the generator frozen (``d2_align_correction.yaml``), stage 2
  is the same direct trainer against the corrected reward (``d2_align.yaml``).

Every method is trained in ``segments`` parts (ending on rollout boundaries for the group-RL methods), resumed from
its checkpoint, and evaluated after each, so the report has the trajectory and ``gold_best`` (the best gold adherence
seen along the way).

Evaluation: 16 samples of each of the 12 prompts with the ODE sampler (20 steps, CFG 3, fixed seeds), as the flow
world's other evidence. ``proxy`` = mean toy-reward-model score of those samples; diversity = ``pvs`` (DivGenBench's
photographic variance, per prompt), ``spread`` (1 − mean pairwise cosine of the reward model's image embeddings, an
IDS analogue), ``spread_silhouette`` (the same on the colour-free silhouette of
:func:`~diffalign.toy.metrics.silhouette_embeds`, the counterpart of IDS's identity embedding), ``layout`` (the SDI
analogue on the detected shape boxes), ``centre_distance`` (mean pixel distance of the shapes from the frame's
centre: where a narrowing mode gathers), the toy attribute ``diversity``, and
``pvs_right_colour`` / ``spread_right_colour`` (the same two among the right-colour samples only);
``proxy_gold_auc`` = how often the proxy scores a right-colour sample above a wrong-colour sample of the same prompt
(:func:`~diffalign.eval.reward_agreement.within_prompt_auc`: the only ordering group-relative RL sees).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.eval.diversity import embedding_spread, layout_dispersion, pvs_per_prompt, rows_by_prompt
from diffalign.eval.reward_agreement import within_prompt_auc
from diffalign.methods import get_method
from diffalign.toy.configs import CONFIG_DIR, toy_run_config
from diffalign.toy.experiment import Evaluation, first_per_prompt, segment_cuts, segment_overrides
from diffalign.toy.flow_experiment import evaluate_flow
from diffalign.toy.flow_pretrain import ensure_flow_base
from diffalign.toy.metrics import centre_distance, colour_correct, silhouette_embeds
from diffalign.toy.reports import chosen_methods, finish_report, format_checks, write_report
from diffalign.toy.rewards import load_toy_reward_model, shape_boxes

ONLINE_METHODS = ("flow_grpo", "grpo_guard", "direct_reward", "d2_align")


def right_colour_diversity(images, prompts: Sequence[str], embeds: torch.Tensor, correct) -> dict[str, float]:
    """``pvs`` and ``spread`` among the right-colour samples only (prompts with >= 2 of them; NaN when none has):
    the diversity within the mode the gold metric asks for. On this world the reward model's image embedding is
    mostly colour, so the all-sample ``spread`` falls whenever gold rises; this one does not have to."""
    keep = [i for i in range(len(prompts)) if correct[i]]
    kept = [prompts[i] for i in keep]
    if all(len(rows) < 2 for rows in rows_by_prompt(kept).values()):  # the metrics skip single-sample prompts
        return {"pvs_right_colour": float("nan"), "spread_right_colour": float("nan")}
    return {
        "pvs_right_colour": pvs_per_prompt(images[keep], kept),
        "spread_right_colour": embedding_spread(embeds[keep], kept),
    }


def online_metrics(evaluation: Evaluation, reward_model) -> dict[str, float]:
    images, prompts = evaluation.images, evaluation.prompts
    correct = colour_correct(images, prompts)
    with torch.no_grad():
        proxy = reward_model(images, prompts).float()
        embeds = reward_model.image_embeds(images).float()
    return {
        "gold": evaluation.metrics["adherence"],
        "shape": evaluation.metrics["shape_adherence"],
        "proxy": float(proxy.mean()),
        "pvs": pvs_per_prompt(images, prompts),
        "spread": embedding_spread(embeds, prompts),
        "spread_silhouette": embedding_spread(silhouette_embeds(images), prompts),
        "layout": layout_dispersion(shape_boxes(images), prompts),
        "centre_distance": centre_distance(images),
        "diversity": evaluation.metrics["diversity"],
        "brightness": evaluation.metrics["mean_brightness"],
        "proxy_gold_auc": within_prompt_auc(proxy, correct, prompts),
        **right_colour_diversity(images, prompts, embeds, correct),
    }


def judged_flow_base(n_per_prompt: int) -> tuple[Path, Any, Evaluation, dict[str, float]]:
    """Where every online evidence run starts: the flow base, the toy reward model, the base's evaluation
    (``n_per_prompt`` samples of each prompt) and its :func:`online_metrics`."""
    base = ensure_flow_base()
    reward_model = load_toy_reward_model()
    evaluation = evaluate_flow(base, n_per_prompt=n_per_prompt)
    return base, reward_model, evaluation, online_metrics(evaluation, reward_model)


def steps_per_rollout(config) -> int:
    """Optimizer steps of one rollout epoch on one process, from the registered trainer's rollout layout (segments
    of a group-RL run must end on a rollout boundary); 1 for a trainer without rollout epochs."""
    trainer = get_method(config.train.method, "diffusion").trainer_object()
    layout = getattr(trainer, "rollout_layout", None)
    return layout(config).steps_per_rollout if layout is not None else 1


def _config(name: str, output_dir: Path, overrides: Sequence[str]):
    return toy_run_config(name, ensure_flow_base(), CONFIG_DIR / "prompts.txt", output_dir, overrides)


def _train(config) -> float:
    from diffalign.trainers.run import train

    started = time.perf_counter()
    train(config)
    return time.perf_counter() - started


def run_online_evidence(
    output_dir: str | os.PathLike = "outputs/evidence/online",
    *,
    methods: Sequence[str] | None = None,
    n_per_prompt: int = 16,
    segments: int = 5,
    overrides: Sequence[str] = (),
) -> dict:
    """Train and judge ``methods``; write ``report.json`` / ``report.md`` / ``samples.png`` to ``output_dir``.

    ``overrides`` apply to every config (e.g. ``train.max_steps=20`` for a quick run); group-RL methods are evaluated
    after each of ``segments`` equal parts of ``train.max_steps``."""
    methods = chosen_methods(methods, tuple(ONLINE_METHODS), "online")
    output_dir = Path(output_dir)
    base, reward_model, before_eval, before = judged_flow_base(n_per_prompt)
    report: dict = {
        "world": {"family": "online", "base": str(base), "samples_per_evaluation": len(before_eval.prompts)},
        "base": before,
        "methods": {},
    }
    rows, labels = [first_per_prompt(before_eval, 1)], ["base"]
    for method in methods:
        run_dir = output_dir / "runs" / method
        trajectory, seconds, extra = [], 0.0, []
        if method == "d2_align":
            stage1 = output_dir / "runs" / "d2_align_correction"
            seconds += _train(_config("d2_align_correction", stage1, overrides))
            extra = [f"online.reward_correction={stage1}"]
        config = _config(method, run_dir, [*overrides, *extra])
        total = config.train.max_steps
        unit = steps_per_rollout(config)
        cuts = segment_cuts(total, segments, unit)
        for cut in cuts:
            config = _config(method, run_dir, [*overrides, *extra, *segment_overrides(cut, cuts)])
            seconds += _train(config)
            evaluation = evaluate_flow(base, run_dir, n_per_prompt=n_per_prompt)
            trajectory.append({"step": cut, **online_metrics(evaluation, reward_model)})
            write_report(output_dir, report, format_online_report)
        after = trajectory[-1]
        report["methods"][method] = {
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items() if k != "step"},
            "gold_best": max([before["gold"]] + [t["gold"] for t in trajectory]),
            "proxy_gain": after["proxy"] - before["proxy"],
            "trajectory": trajectory,
            "seconds": seconds,
        }
        rows.append(first_per_prompt(evaluation, 1))
        labels.append(method)
        write_report(output_dir, report, format_online_report)
    return finish_report(output_dir, report, format_online_report, issue_checks, rows, labels)


GUARD_GOLD_TOLERANCE = 0.02  # GRPO-Guard's gold may sit at most 2 points below its best so far
GOLD_DRIFT = 0.03  # "visibly drifts": gold at least 3 points below its best so far


def issue_checks(report: dict) -> dict[str, float | bool]:
    """The acceptance numbers, computed from the report (absent methods are skipped)."""
    m, base, out = report["methods"], report["base"], {}
    if "flow_grpo" in m:
        fg = m["flow_grpo"]
        out["flow_grpo_raises_proxy"] = fg["proxy_gain"] > 0
        out["flow_grpo_drifts"] = fg["proxy_gain"] > 0 and (
            fg["gold_after"] < fg["gold_best"] - 0.02 or fg["pvs_after"] < 0.8 * base["pvs"]
        )
        out["flow_grpo_gold_drift_at_steps"] = gold_drift_budgets(fg["trajectory"], base["gold"])
    if "flow_grpo" in m and "grpo_guard" in m:
        fg, gg = m["flow_grpo"], m["grpo_guard"]
        out["guard_gold_drop_from_best"] = gg["gold_best"] - gg["gold_after"]
        out["guard_proxy_gain_vs_flow_grpo"] = gg["proxy_gain"] / fg["proxy_gain"] if fg["proxy_gain"] else float("nan")
        out["guard_ok"] = (
            out["guard_gold_drop_from_best"] <= GUARD_GOLD_TOLERANCE and out["guard_proxy_gain_vs_flow_grpo"] >= 0.9
        )
        out["guard_ok_at_steps"] = guard_budgets(gg["trajectory"], fg["trajectory"], base)
    if "d2_align" in m and "direct_reward" in m:
        d2, dr = m["d2_align"], m["direct_reward"]
        for key in ("pvs", "spread"):
            out[f"d2_align_{key}_vs_base"] = d2[f"{key}_after"] / base[key]
            out[f"direct_reward_{key}_vs_base"] = dr[f"{key}_after"] / base[key]
        out["d2_align_ok_at_steps"] = d2_align_budgets(d2["trajectory"], dr["trajectory"], base)
        out["d2_align_ok"] = bool(out["d2_align_ok_at_steps"])
        out["d2_align_pvs_ok_at_steps"] = d2_align_budgets(d2["trajectory"], dr["trajectory"], base, keys=("pvs",))
        out["d2_align_ok_silhouette_at_steps"] = d2_align_budgets(
            d2["trajectory"], dr["trajectory"], base, keys=("pvs", "spread_silhouette")
        )
        out["d2_align_ok_right_colour_at_steps"] = d2_align_budgets(
            d2["trajectory"], dr["trajectory"], base, keys=("pvs_right_colour", "spread_right_colour")
        )
    return out


def gold_below_best(trajectory: list[dict], gold_before: float) -> dict[int, float]:
    """Step -> how far the run's gold sits below the best gold seen up to that step (the base included)."""
    best, below = gold_before, {}
    for t in trajectory:
        best = max(best, t["gold"])
        below[t["step"]] = best - t["gold"]
    return below


def gold_drift_budgets(trajectory: list[dict], gold_before: float, drop: float = GOLD_DRIFT) -> list[int]:
    """The steps at which the run's gold is at least ``drop`` below its best so far."""
    return [step for step, below in gold_below_best(trajectory, gold_before).items() if below >= drop - 1e-12]


def guard_budgets(guard: list[dict], plain: list[dict], base: dict) -> list[int]:
    """The steps, judged in both runs, at which GRPO-Guard's gold is within 2 points of its best so far and its proxy
    gain is >= 90 % of plain Flow-GRPO's (which must be > 0), while plain Flow-GRPO's gold has drifted >= 3 points
    below its own best: the acceptance criterion, budget by budget."""
    guard_below = gold_below_best(guard, base["gold"])
    drifted = set(gold_drift_budgets(plain, base["gold"]))
    plain_proxy = {t["step"]: t["proxy"] - base["proxy"] for t in plain}
    return [
        t["step"]
        for t in guard
        if t["step"] in drifted
        and guard_below[t["step"]] <= GUARD_GOLD_TOLERANCE + 1e-12
        and plain_proxy[t["step"]] > 0
        and t["proxy"] - base["proxy"] >= 0.9 * plain_proxy[t["step"]]
    ]


def d2_align_budgets(
    d2: list[dict], uncorrected: list[dict], base: dict, keys: tuple[str, ...] = ("pvs", "spread")
) -> list[int]:
    """The steps, judged in both runs, at which D²-Align keeps every diversity ``keys`` (by default PVS and embedding
    spread) >= 80 % of the base while the uncorrected trainer is below 50 % on each, with D²-Align's gold not lower
    (the acceptance criterion). A NaN (no right-colour pair to measure) fails the step."""
    at = {t["step"]: t for t in uncorrected}

    def ratios(point: dict) -> list[float]:
        return [point[k] / base[k] for k in keys]

    return [
        t["step"]
        for t in d2
        if t["step"] in at
        and all(r >= 0.8 for r in ratios(t))  # False on NaN
        and all(r < 0.5 for r in ratios(at[t["step"]]))
        and t["gold"] >= at[t["step"]]["gold"]
    ]


def format_online_report(report: dict) -> str:
    base = report["base"]
    lines = [
        f"Toy world (online), {report['world']['samples_per_evaluation']} generated samples per evaluation (ODE, "
        "20 steps, CFG 3). gold = colour adherence; proxy = the biased toy reward model; pvs / spread = diversity.",
        "",
        "| method | gold after (best) | proxy | proxy-gold AUC | pvs | spread | silhouette spread | "
        "right colour: pvs / spread | brightness | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base | {base['gold']:.3f} | {base['proxy']:.3f} | {base['proxy_gold_auc']:.3f} | {base['pvs']:.3f} | "
        f"{base['spread']:.3f} | {base['spread_silhouette']:.3f} | "
        f"{base['pvs_right_colour']:.3f} / {base['spread_right_colour']:.3f} | {base['brightness']:.3f} | - |",
    ]
    for name, m in report["methods"].items():
        lines.append(
            f"| {name} | {m['gold_after']:.3f} ({m['gold_best']:.3f}) | {m['proxy_after']:.3f} | "
            f"{m['proxy_gold_auc_after']:.3f} | {m['pvs_after']:.3f} | {m['spread_after']:.3f} | "
            f"{m['spread_silhouette_after']:.3f} | "
            f"{m['pvs_right_colour_after']:.3f} / {m['spread_right_colour_after']:.3f} | "
            f"{m['brightness_after']:.3f} | {m['seconds']:.0f} |"
        )
    for name, m in report["methods"].items():
        if len(m["trajectory"]) > 1:
            steps = ", ".join(
                f"{t['step']}: gold {t['gold']:.3f} proxy {t['proxy']:.2f} pvs {t['pvs']:.3f} spread {t['spread']:.3f}"
                f" silhouette {t['spread_silhouette']:.3f}"
                f" (right colour: pvs {t['pvs_right_colour']:.3f} spread {t['spread_right_colour']:.3f})"
                for t in m["trajectory"]
            )
            lines += ["", f"{name} trajectory — {steps}"]
    lines += format_checks(report.get("checks"))
    return "\n".join(lines) + "\n"
