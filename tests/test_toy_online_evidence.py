"""``diffalign evidence online`` end to end with the shipped toy configs, at a small budget: Flow-GRPO and the direct
reward trainer (plain and D²-Align-corrected) raise the biased toy reward model's score of the flow base's samples,
and the report is written in the evidence format (trajectory, ``gold_best``, ``proxy_*``, checks). The full-budget
numbers are in docs/toy-world.md."""

from __future__ import annotations

import json

from diffalign.toy.online_evidence import d2_align_budgets, run_online_evidence


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
    d2[1]["gold"] = 0.34  # lower gold than the uncorrected run at 75
    assert d2_align_budgets(d2, uncorrected, base) == []
    assert d2_align_budgets(d2[:1], uncorrected[1:], base) == []  # no common budget
