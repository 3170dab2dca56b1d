"""``diffalign evidence nft``: DiffusionNFT against Flow-GRPO, and MARBLE against the weighted sum, on the toy flow
base.

* ``flow_grpo`` / ``nft`` — the same base, prompts, reward (the learned, brightness-biased toy reward model: the
  *proxy*) and rollout size (96 images per epoch); each trained in segments and judged after each, so the report
  has wall-clock seconds and rollout epochs along the way. Reported: when NFT first reaches Flow-GRPO's best proxy
  (seconds, rollouts), and both methods' gold / diversity at NFT's final wall time.
* ``weighted_sum`` / ``marble`` — DiffusionNFT with four toy rewards that disagree: the proxy (brighter is better),
  the gold colour, the gold shape on triangle prompts only, and darkness on blue prompts only (the last two are
  *specialists*: NaN, no signal, on the other prompts). ``weighted_sum`` adds them (and logs each reward's gradient
  cosine with its update); ``marble`` balances them (``online.reward_balance: marble``). Reported: each reward's gain
  over the base and the logged cosines (the paper's diagnostic: the worst-aligned reward's cosine is negative under
  the weighted sum, positive under MARBLE).

Evaluation as ``diffalign evidence online``: 16 samples of each of the 12 prompts with the ODE sampler (20 steps,
CFG 3, fixed seeds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.rewards.from_config import reward_from_name
from diffalign.toy.experiment import Evaluation, first_per_prompt, segment_cuts, segment_overrides
from diffalign.toy.flow_experiment import evaluate_flow
from diffalign.toy.online_evidence import _config, _train, judged_flow_base, online_metrics, steps_per_rollout
from diffalign.toy.reports import chosen_methods, finish_report, format_checks, write_report

NFT_METHODS = ("flow_grpo", "nft", "weighted_sum", "marble")
CONFIGS = {"flow_grpo": "flow_grpo", "nft": "nft", "weighted_sum": "nft_weighted_sum", "marble": "nft_marble"}
MULTI_REWARD = ("weighted_sum", "marble")


def reward_means(config, evaluation: Evaluation) -> dict[str, float]:
    """Each of ``config``'s rewards averaged over the evaluation samples it applies to."""
    oc = config.online
    out = {}
    for name in oc.reward_functions:
        reward = reward_from_name(name, oc.reward_options.get(name))
        with torch.no_grad():
            out[name] = float(torch.nanmean(reward(evaluation.images, evaluation.prompts).float()))
    return out


def _cosines(run_dir: Path) -> dict[str, float]:
    """From the run's metrics: the share of logged steps whose worst reward-gradient cosine is negative, and the
    mean of each reward's cosine."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "balance/cos_min" in r]
    if not rows:
        return {}
    out = {"negative_share": sum(r["balance/cos_min"] < 0 for r in rows) / len(rows), "logged": len(rows)}
    for key in rows[0]:
        if key.startswith("balance/cos_") and key != "balance/cos_min":
            out[key.removeprefix("balance/cos_")] = sum(r[key] for r in rows) / len(rows)
    return out


def run_nft_evidence(
    output_dir: str | os.PathLike = "outputs/evidence/nft",
    *,
    methods: Sequence[str] | None = None,
    n_per_prompt: int = 16,
    segments: int = 5,
    overrides: Sequence[str] = (),
) -> dict:
    """Train and judge ``methods``; write ``report.json`` / ``report.md`` / ``samples.png`` to ``output_dir``."""
    methods = chosen_methods(methods, tuple(NFT_METHODS), "nft")
    output_dir = Path(output_dir)
    base, reward_model, before_eval, before = judged_flow_base(n_per_prompt)
    report: dict = {
        "world": {"family": "nft", "base": str(base), "samples_per_evaluation": len(before_eval.prompts)},
        "base": before,
        "methods": {},
    }
    multi = _config(CONFIGS["marble"], output_dir / "runs" / "probe", overrides)
    report["base_rewards"] = reward_means(multi, before_eval)
    rows, labels = [first_per_prompt(before_eval, 1)], ["base"]
    for method in methods:
        run_dir = output_dir / "runs" / method
        config = _config(CONFIGS[method], run_dir, overrides)
        unit = steps_per_rollout(config)
        cuts = segment_cuts(config.train.max_steps, segments, unit)
        trajectory, seconds = [], 0.0
        for cut in cuts:
            config = _config(CONFIGS[method], run_dir, [*overrides, *segment_overrides(cut, cuts)])
            seconds += _train(config)
            evaluation = evaluate_flow(base, run_dir, n_per_prompt=n_per_prompt)
            point = {"step": cut, "rollouts": cut // unit, "seconds": seconds}
            point.update(online_metrics(evaluation, reward_model))
            if method in MULTI_REWARD:
                point["rewards"] = reward_means(config, evaluation)
            trajectory.append(point)
            write_report(output_dir, report, format_nft_report)
        entry = {"trajectory": trajectory, "seconds": seconds, "final": trajectory[-1]}
        if method in MULTI_REWARD:
            entry["cosines"] = _cosines(run_dir)
        report["methods"][method] = entry
        rows.append(first_per_prompt(evaluation, 1))
        labels.append(method)
        write_report(output_dir, report, format_nft_report)
    return finish_report(output_dir, report, format_nft_report, issue_checks, rows, labels)


def _at_time(trajectory: list[dict], seconds: float) -> dict:
    """The last point of ``trajectory`` reached by ``seconds`` (the first point if none is)."""
    reached = [t for t in trajectory if t["seconds"] <= seconds * 1.0001]
    return reached[-1] if reached else trajectory[0]


def issue_checks(report: dict) -> dict[str, float | bool]:
    """The acceptance numbers, computed from the report (absent methods are skipped)."""
    m, base, out = report["methods"], report["base"], {}
    if "nft" in m:
        out["nft_raises_proxy"] = m["nft"]["final"]["proxy"] > base["proxy"]
    if "flow_grpo" in m:
        out["flow_grpo_raises_proxy"] = m["flow_grpo"]["final"]["proxy"] > base["proxy"]
    if "flow_grpo" in m and "nft" in m:
        fg, nft = m["flow_grpo"]["trajectory"], m["nft"]["trajectory"]
        best = max(fg, key=lambda t: t["proxy"])
        out["flow_grpo_best_proxy"] = best["proxy"]
        out["flow_grpo_seconds_to_best"] = best["seconds"]
        hit = next((t for t in nft if t["proxy"] >= best["proxy"]), None)
        out["nft_reaches_flow_grpo_best"] = hit is not None
        if hit is not None:
            out["nft_seconds_to_flow_grpo_best"] = hit["seconds"]
            out["nft_rollouts_to_flow_grpo_best"] = hit["rollouts"]
            out["nft_time_ratio"] = hit["seconds"] / best["seconds"]
            out["nft_rollout_ratio"] = hit["rollouts"] / max(best["rollouts"], 1)
        final = nft[-1]
        same_time = _at_time(fg, final["seconds"])
        out["gold_at_equal_time"] = {"nft": final["gold"], "flow_grpo": same_time["gold"]}
        out["pvs_at_equal_time"] = {"nft": final["pvs"], "flow_grpo": same_time["pvs"]}
        out["nft_ok"] = bool(hit is not None and out["nft_time_ratio"] <= 1 / 3 and hit["gold"] >= best["gold"] - 1e-9)
    if all(k in m for k in MULTI_REWARD):
        base_rewards = report["base_rewards"]
        gains = {k: {n: m[k]["final"]["rewards"][n] - v for n, v in base_rewards.items()} for k in MULTI_REWARD}
        worst = min(gains["weighted_sum"], key=gains["weighted_sum"].get)
        out["reward_gains"] = gains
        out["weighted_sum_worst_reward"] = worst
        out["marble_improves_every_reward"] = all(g > 0 for g in gains["marble"].values())
        out["marble_ge_weighted_sum_on_worst"] = gains["marble"][worst] >= gains["weighted_sum"][worst]
        out["weighted_sum_negative_cos_share"] = m["weighted_sum"]["cosines"].get("negative_share")
        out["marble_negative_cos_share"] = m["marble"]["cosines"].get("negative_share")
    return out


def format_nft_report(report: dict) -> str:
    base = report["base"]
    lines = [
        f"Toy world (nft), {report['world']['samples_per_evaluation']} generated samples per evaluation (ODE, 20 "
        "steps, CFG 3). gold = colour adherence; proxy = the biased toy reward model; pvs = diversity.",
        "",
        "| method | rollouts | seconds | proxy | gold | shape | pvs | brightness |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | 0 | - | {base['proxy']:.3f} | {base['gold']:.3f} | {base['shape']:.3f} | {base['pvs']:.3f} | "
        f"{base['brightness']:.3f} |",
    ]
    for name, m in report["methods"].items():
        for t in m["trajectory"]:
            lines.append(
                f"| {name} | {t['rollouts']} | {t['seconds']:.0f} | {t['proxy']:.3f} | {t['gold']:.3f} | "
                f"{t['shape']:.3f} | {t['pvs']:.3f} | {t['brightness']:.3f} |"
            )
    multi = [k for k in MULTI_REWARD if k in report["methods"]]
    if multi:
        names = list(report["base_rewards"])
        lines += [
            "",
            "| rewards (mean where each applies) | " + " | ".join(names) + " | negative-cos share |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        lines.append("| base | " + " | ".join(f"{report['base_rewards'][n]:.3f}" for n in names) + " | - |")
        for k in multi:
            final, cos = report["methods"][k]["final"]["rewards"], report["methods"][k]["cosines"]
            share = f"{cos['negative_share']:.2f} of {cos['logged']}" if cos else "-"
            lines.append(f"| {k} | " + " | ".join(f"{final[n]:.3f}" for n in names) + f" | {share} |")
    lines += format_checks(report.get("checks"))
    return "\n".join(lines) + "\n"
