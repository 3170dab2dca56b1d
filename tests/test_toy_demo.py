"""The main job (``diffalign demo``) and ``diffalign evidence offline`` on the committed toy base, in short form."""

from __future__ import annotations

import json

import pytest

from diffalign import cli
from diffalign.toy.demo import run_demo
from diffalign.toy.evidence import format_report, gain_checks, run_offline_evidence

# Short demo on the scaled_linear base: measured 0.646 -> 0.740 on 96 samples (training seed 0; seed 1: 0.688,
# 150 steps at lr 4e-5: 0.688), so the assertion asks for +3 points (docs/toy-world.md).
SMOKE_OVERRIDES = ["train.max_steps=100", "optim.lr=6e-5", "train.checkpointing_steps=1000", "train.progress_bar=false"]


def test_demo_smoke_raises_colour_adherence(tmp_path, capfd) -> None:
    report = run_demo(tmp_path, n_per_prompt=8, overrides=SMOKE_OVERRIDES)
    out, err = capfd.readouterr()
    assert "kept in float32" not in out + err  # diffusers warns on every dtype .to(), even a no-op one
    assert out.rstrip().endswith(f"grid: {report['grid']}")  # the summary table and the grid path come last
    assert report["samples_per_evaluation"] == 96
    assert report["adherence_after"] >= report["adherence_before"] + 0.03, report
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["adherence_before"] == report["adherence_before"]
    assert (tmp_path / "before_after.png").stat().st_size > 0


def test_evidence_report_format(tmp_path) -> None:
    overrides = ["train.max_steps=2", "train.checkpointing_steps=1000", "train.progress_bar=false"]
    report = run_offline_evidence(tmp_path, methods=("sft",), n_per_prompt=1, overrides=overrides)
    entry = report["methods"]["sft"]
    expected = {"gold_before", "gold_after", "diversity_before", "diversity_after", "seconds"}
    assert expected <= set(entry) and all(0.0 <= entry[k] <= 1.0 for k in expected - {"seconds"})
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = (tmp_path / "report.md").read_text()
    assert table == format_report(report)
    row = next(line for line in table.splitlines() if line.startswith("| sft |"))
    assert row.startswith(f"| sft | {entry['gold_before']:.3f} | {entry['gold_after']:.3f} |")
    gain = 100 * (entry["gold_after"] - entry["gold_before"])
    assert report["checks"]["sft_gain_pts"] == pytest.approx(gain, abs=1e-9)
    assert table.splitlines()[-1].startswith(f"Checks: sft_gain_pts = {gain:.3f}")


def test_gain_checks_need_20_points_under_both_samplers() -> None:
    def method(before: float, after: float, before_eta0: float, after_eta0: float) -> dict:
        return {"gold_before": before, "gold_after": after, "gold_before_eta0": before_eta0,
                "gold_after_eta0": after_eta0}  # fmt: skip

    report = {
        "world": {"alternative_key": "eta0"},
        "methods": {
            "dpo": method(0.5, 0.9, 0.5, 0.3),  # +40 / -20: fails under eta 0
            "mapo": method(0.5, 0.7, 0.4, 0.6),  # +20 / +20 exactly: holds
            "dcpo": method(0.5, 0.69, 0.5, 0.9),  # +19 / +40
        },
    }
    checks = gain_checks(report)
    assert checks["dpo_gain_pts"] == pytest.approx(40.0) and checks["dpo_gain_pts_eta0"] == pytest.approx(-20.0)
    assert checks["gain_20_pts_under_both"] == ["mapo"]


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--output-dir", "OUT", "train.max_steps=3"],
        ["demo", "train.max_steps=3", "--output-dir", "OUT"],
    ],
)
def test_cli_takes_overrides_before_or_after_options(monkeypatch, argv) -> None:
    seen = {}
    monkeypatch.setattr("diffalign.toy.demo.run_demo", lambda out, **kw: seen.update(out=out, **kw))
    from transformers.utils import logging as transformers_logging

    try:
        assert cli.main(argv) == 0
        assert not transformers_logging.is_progress_bar_enabled()  # no "Loading weights" bar per tiny model load
    finally:
        transformers_logging.enable_progress_bar()
    assert seen == {"out": "OUT", "n_per_prompt": 16, "overrides": ["train.max_steps=3"]}


def test_cli_rejects_stray_arguments(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--output-dir", "OUT", "--bogus"])
    assert cli.main(["demo", "--output-dir", "OUT", "not-an-override"]) == 2
    assert "override 'not-an-override'): an override must look like key=value" in capsys.readouterr().err
    assert not (tmp_path / "OUT").exists()  # rejected before any data was built
