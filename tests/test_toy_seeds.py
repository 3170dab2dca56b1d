"""``diffalign evidence NAME --seeds N``: the mean report of N training seeds (numbers averaged leaf by leaf, min and
max beside them, checks recomputed on the means), by hand and end to end on the cheap LLM family."""

from __future__ import annotations

import json

import pytest

from diffalign import cli
from diffalign.errors import DiffalignError
from diffalign.toy.seeds import combine, mean_report, merge_seed_reports, run_over_seeds


def _report(gold: float, trajectory: list[float], seconds: int) -> dict:
    return {
        "world": {"base": "path/of/the/base", "samples": 96},
        "methods": {"dpo": {"gold_after": gold, "seconds": seconds, "ok": gold > 0.5, "best": None}},
        "trajectory": [{"step": s, "gold": g} for s, g in zip((100, 200), trajectory, strict=True)],
        "checks": {"dpo_ok": gold > 0.7},
    }


def test_mean_report_averages_every_number_and_keeps_the_range() -> None:
    reports = [_report(0.6, [0.2, 0.5], 10), _report(0.9, [0.4, 0.8], 14), _report(0.75, [0.3, 0.2], 12)]
    report = mean_report(reports, [0, 1, 2], checks=lambda r: {"dpo_ok": r["methods"]["dpo"]["gold_after"] > 0.7})
    assert report["methods"]["dpo"]["gold_after"] == pytest.approx(0.75, abs=1e-12)
    assert report["methods"]["dpo"]["seconds"] == pytest.approx(12.0)
    assert [t["gold"] for t in report["trajectory"]] == pytest.approx([0.3, 0.5])  # budget by budget
    assert [t["step"] for t in report["trajectory"]] == [100, 200]  # equal in every seed: kept, ints stay ints
    assert report["world"] == {"base": "path/of/the/base", "samples": 96}
    assert report["methods"]["dpo"]["ok"] is True and report["methods"]["dpo"]["best"] is None  # first seed's
    # checks on the means (0.75 > 0.7) although one seed of three failed them
    assert report["checks"] == {"dpo_ok": True}
    assert report["seeds"]["checks"] == [{"dpo_ok": False}, {"dpo_ok": True}, {"dpo_ok": True}]
    assert report["seeds"]["min"]["methods"]["dpo"] == {"gold_after": 0.6, "seconds": 10.0}
    assert report["seeds"]["max"]["methods"]["dpo"] == {"gold_after": 0.9, "seconds": 14.0}
    assert [t["gold"] for t in report["seeds"]["max"]["trajectory"]] == [0.4, 0.8]


def test_combine_names_where_the_seeds_reports_differ() -> None:
    with pytest.raises(ValueError, match=r"report\.methods\.dpo: the seeds' reports have different keys"):
        combine([{"methods": {"dpo": {"a": 1}}}, {"methods": {"dpo": {"b": 1}}}], max)
    with pytest.raises(ValueError, match=r"report\.t: the seeds' reports have lists of different lengths"):
        combine([{"t": [1, 2]}, {"t": [1]}], max)
    assert combine([{"x": 1.0}, {"x": None}], max) == {"x": None}  # a number missing in one seed


def test_a_train_seed_override_is_refused(tmp_path) -> None:
    with pytest.raises(DiffalignError, match="drop the train.seed override"):
        run_over_seeds(lambda *a, **k: {}, tmp_path, [0, 1], format_report=str, overrides=["train.seed=3"])


def test_llm_evidence_over_two_seeds(tmp_path, capsys) -> None:
    argv = ["evidence", "llm", "--seeds", "2", "--methods", "llm_dpo", "--n-per-prompt", "4"]
    assert cli.main([*argv, "--output-dir", str(tmp_path), "train.max_steps=20", "train.progress_bar=false"]) == 0
    seeds = [json.loads((tmp_path / f"seed{s}" / "report.json").read_text())["methods"]["llm_dpo"] for s in (0, 1)]
    report = json.loads((tmp_path / "report.json").read_text())
    dpo = report["methods"]["llm_dpo"]
    assert dpo["gold_after"] == pytest.approx((seeds[0]["gold_after"] + seeds[1]["gold_after"]) / 2, abs=1e-12)
    assert dpo["gold_before"] == seeds[0]["gold_before"] == seeds[1]["gold_before"]  # same sampling seeds
    assert seeds[0]["gold_after"] != seeds[1]["gold_after"]  # the training seed changes the run
    assert report["seeds"]["min"]["methods"]["llm_dpo"]["gold_after"] == min(s["gold_after"] for s in seeds)
    printed = capsys.readouterr().out
    assert "Mean of 2 training seeds (0, 1)" in printed and "| llm_dpo | gold_after |" in printed
    assert printed.strip().endswith((tmp_path / "report.md").read_text().strip())  # after the trainers' summaries

    # The same seeds run apart and merged afterwards give the same report, without training anything.
    merged_dir = tmp_path / "merged"
    runs = f"{tmp_path / 'seed1'},{tmp_path / 'seed0'}"
    assert cli.main(["evidence", "llm", "--merge", runs, "--output-dir", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "report.json").read_text())
    assert merged["seeds"]["seeds"] == [1, 0]
    assert merged["methods"] == report["methods"] and merged.get("checks") == report.get("checks")
    assert cli.main(["evidence", "llm", "--merge", runs, "--output-dir", str(merged_dir)]) == 2  # never overwrites
    assert "exists; pick another --output-dir" in capsys.readouterr().err
    assert cli.main(["evidence", "llm", "--merge", runs, "--seeds", "2", "--output-dir", str(tmp_path / "m2")]) == 2
    assert "--merge trains nothing" in capsys.readouterr().err


def _seed_run(directory, seed: int, gold: float) -> str:
    (directory / "runs" / "dpo").mkdir(parents=True)
    (directory / "runs" / "dpo" / "config.yaml").write_text(f"train:\n  seed: {seed}\n")
    (directory / "report.json").write_text(json.dumps(_report(gold, [0.2, gold], 10)))
    return str(directory)


def test_merge_reads_each_runs_seed_and_refuses_repeats(tmp_path) -> None:
    a, b = _seed_run(tmp_path / "a", 4, 0.6), _seed_run(tmp_path / "b", 7, 0.9)
    report = merge_seed_reports([a, b], tmp_path / "out", format_report=lambda r: "")
    assert report["seeds"]["seeds"] == [4, 7]
    assert report["methods"]["dpo"]["gold_after"] == pytest.approx(0.75, abs=1e-12)
    c = _seed_run(tmp_path / "c", 4, 0.7)
    with pytest.raises(DiffalignError, match=r"training seeds \[4, 7, 4\] repeat"):
        merge_seed_reports([a, b, c], tmp_path / "out2", format_report=lambda r: "")
    with pytest.raises(DiffalignError, match="no evidence report there"):
        merge_seed_reports([a, str(tmp_path / "missing")], tmp_path / "out3", format_report=lambda r: "")
    with pytest.raises(DiffalignError, match="at least two"):
        merge_seed_reports([a], tmp_path / "out4", format_report=lambda r: "")


def test_seeds_below_one_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["evidence", "llm", "--seeds", "0"])
    assert "--seeds 0: give at least 1 training seed" in capsys.readouterr().err
