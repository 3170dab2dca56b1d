"""``diffalign evidence flux``: the smoke run of Diffusion-DPO and Flow-GRPO on a tiny FLUX.1-dev, through the
command line, runs both loops to their last step with finite losses (no effect is asserted: it is a smoke run)."""

from __future__ import annotations

import json
import math

import pytest

from diffalign.cli import main


def test_the_flux_smoke_evidence_runs_both_loops_with_finite_losses(tmp_path, capsys):
    assert main(["evidence", "flux", "--output-dir", str(tmp_path)]) in (None, 0)
    printed = capsys.readouterr().out
    assert "| dpo | 2 |" in printed and "| flow_grpo | 2 |" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    for method in ("dpo", "flow_grpo"):
        r = report["methods"][method]
        assert r["steps"] == 2 and len(r["losses"]) == 2 and r["finite"]
        assert all(math.isfinite(v) for v in r["losses"])
    assert report["methods"]["dpo"]["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0 at init
