"""``diffalign evidence soar`` and ``diffalign evidence sail`` end to end with the shipped toy configs at a tiny
budget (the report format, resumed segments, per-round SAIL records), and the acceptance checks on hand-made
reports. The full-budget numbers are in docs/toy-world.md."""

from __future__ import annotations

import json

import pytest

from diffalign.toy.experiment import segment_cuts
from diffalign.toy.sail_evidence import run_sail_evidence, sail_checks
from diffalign.toy.soar_evidence import run_soar_evidence, soar_checks


def test_segment_cuts_end_on_the_unit_and_the_total() -> None:
    assert segment_cuts(800, 4) == [200, 400, 600, 800]
    assert segment_cuts(300, 12)[:3] == [25, 50, 75] and segment_cuts(300, 12)[-1] == 300
    assert segment_cuts(10, 3, unit=4) == [4, 8]  # 3.3 -> 4, 6.7 -> 8, 10 -> 8: rollout epochs of 4 steps


def test_soar_evidence_runs_in_segments(tmp_path) -> None:
    report = run_soar_evidence(
        tmp_path,
        n_per_prompt=2,
        segments=2,
        overrides=["train.max_steps=4", "train.progress_bar=false"],
        held_out_per_prompt=1,
    )  # the caller's max_steps wins over the evidence's 1600
    for name in ("sft", "soar"):
        m = report["methods"][name]
        assert [t["step"] for t in m["trajectory"]] == [2, 4]
        assert m["gold_after"] == m["trajectory"][-1]["gold"] and 0.0 <= m["gold_after"] <= 1.0
        assert m["gold_before"] == report["base"]["gold"]
        assert m["trajectory_error_before"] == report["base"]["trajectory_error"]
        assert m["trajectory_error_after"] == m["trajectory"][-1]["trajectory_error"] > 0.0
    # SOAR changes the update: after 4 equal steps the two runs' trajectory errors differ
    assert report["methods"]["sft"]["trajectory_error_after"] != report["methods"]["soar"]["trajectory_error_after"]
    assert [b["step"] for b in report["checks"]["budgets"]] == [2, 4]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "| soar | 4 |" in (tmp_path / "report.md").read_text() and (tmp_path / "samples.png").is_file()


def _soar_report(budgets: list[tuple[int, float, float, float, float]]) -> dict:
    """(step, sft gold, soar gold, sft error, soar error) per budget -> a report with those trajectories."""
    def trajectory(gold_at: int, error_at: int) -> list[dict]:
        return [{"step": b[0], "gold": b[gold_at], "trajectory_error": b[error_at]} for b in budgets]

    return {"methods": {"sft": {"trajectory": trajectory(1, 3)}, "soar": {"trajectory": trajectory(2, 4)}}}


@pytest.mark.parametrize(
    ("budgets", "ok", "ok_at"),
    [
        ([(100, 0.8, 0.9, 0.05, 0.04), (200, 1.0, 1.0, 0.05, 0.04)], True, [100]),  # higher where open, tie at 1
        ([(100, 0.8, 0.8, 0.05, 0.04)], False, []),  # gold not higher where SFT had room
        ([(100, 0.8, 0.9, 0.05, 0.06), (200, 0.9, 0.95, 0.05, 0.04)], False, [200]),  # error higher at 100
        ([(100, 1.0, 1.0, 0.05, 0.04)], False, []),  # no budget where gold could rise
        ([(100, 0.8, 0.9, 0.05, 0.04), (200, 1.0, 0.99, 0.05, 0.04)], False, [100]),  # gold lower at a budget
    ],
)
def test_soar_checks(budgets, ok, ok_at) -> None:
    checks = soar_checks(_soar_report(budgets))
    assert checks["soar_ok"] is ok and checks["soar_ok_at_steps"] == ok_at
    assert checks["budgets"][0]["gold_minus_sft"] == pytest.approx(budgets[0][2] - budgets[0][1])
    assert checks["budgets"][0]["trajectory_error_vs_sft"] == pytest.approx(budgets[0][4] / budgets[0][3])


def test_sail_evidence_small_budget(tmp_path) -> None:
    report = run_sail_evidence(
        tmp_path,
        n_per_prompt=2,
        overrides=[
            "train.max_steps=3",
            "train.progress_bar=false",
            "sail.rounds=1",
            "sail.steps_per_round=2",
            "sail.prompts_per_round=4",
            "sail.samples_per_prompt=2",
            "sail.reward_draws=2",
            "sail.sample_steps=2",
        ],
    )
    assert set(report["methods"]) == {"dpo_seed", "dpo_full", "sail"}
    rounds = report["methods"]["sail"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and all(0.0 <= r["gold"] <= 1.0 for r in rounds)
    assert rounds[1]["gold"] == report["methods"]["sail"]["gold_after"]  # the final model is the last round's
    assert set(report["checks"]) == {"sail_minus_dpo_seed", "dpo_full_minus_sail", "sail_ok"}
    assert json.loads((tmp_path / "report.json").read_text()) == report


@pytest.mark.parametrize(("seed", "full", "sail", "ok"), [(0.6, 0.9, 0.86, True), (0.6, 0.9, 0.84, False),
                                                          (0.9, 0.95, 0.9, False)])  # fmt: skip
def test_sail_checks(seed, full, sail, ok) -> None:
    report = {"methods": {k: {"gold_after": v} for k, v in (("dpo_seed", seed), ("dpo_full", full), ("sail", sail))}}
    checks = sail_checks(report)
    assert checks["sail_ok"] is ok and checks["sail_minus_dpo_seed"] == pytest.approx(sail - seed)
