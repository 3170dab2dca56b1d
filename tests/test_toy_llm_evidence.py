"""``diffalign evidence llm`` end to end with the shipped configs: DPO, PRO and GRPO each raise the toy LM's property
rate (the completion names the prompted colour) from the committed base's ~0.4. Measured with these settings
(320 samples per evaluation): DPO +30, PRO +35, GRPO +43 points; the test asserts +15 each, and that the report files
are written in the evidence format."""

from __future__ import annotations

import json

from diffalign.toy.llm_evidence import LLM_METHODS, run_llm_evidence


def test_dpo_pro_and_grpo_raise_the_property_rate(tmp_path) -> None:
    report = run_llm_evidence(tmp_path, n_per_prompt=8, overrides=["train.progress_bar=false"])
    assert set(report["methods"]) == set(LLM_METHODS)
    for method, m in report["methods"].items():
        assert 0.25 < m["gold_before"] < 0.55, m
        assert m["gold_after"] - m["gold_before"] >= 0.15, (method, m)
        assert m["gold_score_after"] > m["gold_score_before"], (method, m)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert "| llm_grpo |" in (tmp_path / "report.md").read_text()
    assert "describe : red circle =>" in (tmp_path / "samples.md").read_text()
