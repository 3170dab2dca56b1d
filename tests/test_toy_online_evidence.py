"""``diffalign evidence online`` end to end with the shipped toy configs, at a small budget: Flow-GRPO and the direct
reward trainer (plain and D²-Align-corrected) raise the biased toy reward model's score of the flow base's samples,
and the report is written in the evidence format (trajectory, ``gold_best``, ``proxy_*``, checks). The full-budget
numbers are in docs/toy-world.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffalign.eval.diversity import embedding_spread, pvs_per_prompt
from diffalign.toy.online_evidence import (
    d2_align_budgets,
    gold_drift_budgets,
    guard_budgets,
    right_colour_diversity,
    run_online_evidence,
)


def test_online_methods_raise_the_proxy_reward(tmp_path) -> None:
    report = run_online_evidence(
        tmp_path,
        methods=["flow_grpo", "direct_reward", "d2_align"],
        n_per_prompt=4,
        segments=2,
        overrides=["train.max_steps=8", "train.progress_bar=false"],
    )
    methods = report["methods"]
    assert [t["step"] for t in methods["flow_grpo"]["trajectory"]] == [4, 8]
    for name, m in methods.items():
        assert m["proxy_gain"] > 0, (name, m)
        assert m["gold_best"] >= max(m["gold_before"], m["gold_after"])
    assert (tmp_path / "runs" / "d2_align_correction" / "correction.safetensors").is_file()
    assert "flow_grpo_raises_proxy" in report["checks"]
    assert isinstance(report["checks"]["d2_align_ok_silhouette_at_steps"], list)
    assert 0.0 < report["base"]["spread_silhouette"] <= 1.0
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "| flow_grpo |" in (tmp_path / "report.md").read_text() and (tmp_path / "samples.png").is_file()


def test_d2_align_criterion_is_judged_per_budget() -> None:
    base = {"pvs": 0.2, "spread": 0.5}

    def point(step: int, gold: float, pvs: float, spread: float) -> dict:
        return {"step": step, "gold": gold, "pvs": pvs, "spread": spread}

    uncorrected = [point(50, 0.40, 0.11, 0.51), point(75, 0.35, 0.03, 0.24), point(100, 0.50, 0.01, 0.09)]
    d2 = [point(50, 0.55, 0.25, 0.44), point(75, 0.58, 0.23, 0.40), point(100, 0.60, 0.21, 0.38)]
    # 50: the uncorrected spread is 102 % (not below 50 %); 75: every number holds (80 % exactly is enough);
    # 100: D²-Align's spread is 76 %
    assert d2_align_budgets(d2, uncorrected, base) == [75]
    # on PVS alone 100 holds too; 50 still fails (the uncorrected PVS is 55 %)
    assert d2_align_budgets(d2, uncorrected, base, keys=("pvs",)) == [75, 100]
    d2[1]["gold"] = 0.34  # lower gold than the uncorrected run at 75
    assert d2_align_budgets(d2, uncorrected, base) == []
    assert d2_align_budgets(d2[:1], uncorrected[1:], base) == []  # no common budget


def test_d2_align_criterion_on_other_diversity_keys() -> None:
    base = {"pvs_right_colour": 0.2, "spread_right_colour": 0.1, "pvs": 1.0, "spread": 1.0}
    keys = ("pvs_right_colour", "spread_right_colour")

    def point(step: int, pvs: float, spread: float) -> dict:
        # the all-sample numbers would fail every step: the keys decide
        return {"step": step, "gold": 0.6, "pvs": 0.0, "spread": 0.0} | {keys[0]: pvs, keys[1]: spread}

    uncorrected = [point(75, 0.05, 0.04), point(100, 0.05, float("nan"))]
    d2 = [point(75, 0.2, 0.09), point(100, 0.2, 0.09)]
    assert d2_align_budgets(d2, uncorrected, base, keys=keys) == [75]  # NaN (nothing to measure) fails 100
    assert d2_align_budgets(d2, uncorrected, base) == []
    d2[0]["spread_right_colour"] = 0.079  # 79 % of the base
    assert d2_align_budgets(d2, uncorrected, base, keys=keys) == []


def test_right_colour_diversity_keeps_prompts_with_two_right_colour_samples() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 3, 8, 8, generator=g)
    embeds = torch.randn(7, 5, generator=g)
    prompts = ["a"] * 4 + ["b"] * 3
    correct = np.array([True, False, True, True, True, False, False])  # "b" has one right sample: left out
    got = right_colour_diversity(images, prompts, embeds, correct)
    rows = [0, 2, 3]
    assert got["spread_right_colour"] == pytest.approx(embedding_spread(embeds[rows], ["a"] * 3), abs=1e-12)
    assert got["pvs_right_colour"] == pytest.approx(pvs_per_prompt(images[rows], ["a"] * 3), abs=1e-6)
    assert got["spread_right_colour"] != pytest.approx(embedding_spread(embeds, prompts))
    unit = torch.nn.functional.normalize(embeds[rows].double(), dim=1)
    sim = unit @ unit.T
    assert got["spread_right_colour"] == pytest.approx(1 - float(sim[[0, 0, 1], [1, 2, 2]].mean()), abs=1e-12)
    nothing = right_colour_diversity(images, prompts, embeds, np.zeros(7, bool))
    assert all(np.isnan(v) for v in nothing.values())


def test_guard_criterion_is_judged_per_budget() -> None:
    base = {"gold": 0.55, "proxy": 2.4}

    def point(step: int, gold: float, proxy: float) -> dict:
        return {"step": step, "gold": gold, "proxy": proxy}

    plain = [point(30, 0.70, 3.0), point(60, 0.67, 3.4), point(90, 0.60, 3.6), point(120, 0.72, 3.8)]
    # plain's gold below its best so far: 0, 3 (exactly: drifted), 10, 0 points
    assert gold_drift_budgets(plain, base["gold"]) == [60, 90]
    assert gold_drift_budgets(plain, 0.80) == [30, 60, 90, 120]  # the base's gold counts as a best
    guard = [point(30, 0.60, 2.9), point(60, 0.80, 3.4), point(90, 0.78, 3.4), point(120, 0.90, 4.0)]
    # 60: within 2 points of its best, proxy gain 1.0 >= 0.9 * 1.0; 90: 2 points below (holds), gain 1.0 >= 0.9 * 1.2
    assert guard_budgets(guard, plain, base) == [60]
    guard[2]["proxy"] = 3.5  # gain 1.1 >= 0.9 * 1.2 = 1.08
    assert guard_budgets(guard, plain, base) == [60, 90]
    guard[2]["gold"] = 0.77  # 3 points below its best: no longer holds
    assert guard_budgets(guard, plain, base) == [60]
