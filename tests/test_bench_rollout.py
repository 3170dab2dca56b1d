"""scripts/bench_rollout.py end to end at toy size (--tiny): it runs every backbone (SD3, SD, FLUX) against
diffusers' pipelines and prints a JSON line with finite positive ratios. The speed itself is not asserted (that is
the script's job at a realistic size, not a unit test's)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_rollout.py"


def test_bench_rollout_tiny_reports_finite_ratios(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    out_file = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--json", str(out_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    summary = json.loads(last)
    assert summary == json.loads(out_file.read_text())
    assert summary["settings"]["tiny"] is True
    backbones = summary["backbones"]
    assert set(backbones) == {"sd3", "sd", "flux"}
    assert set(backbones["flux"]["ratios"]) == {"ours"} and backbones["flux"]["target_ratio"] == 1.05
    assert set(backbones["sd3"]["ratios"]) == {"ours", "ours_keep_means"}
    assert set(backbones["sd"]["ratios"]) == {"ours"}
    for name, result in backbones.items():
        for side, ratio in result["ratios"].items():
            assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, (name, side, ratio)
            assert isinstance(result["meets_target"][side], bool)
        for side, median in result["median_s"].items():
            assert math.isfinite(median) and median > 0, (name, side, median)
            assert len(result["times_s"][side]) == summary["settings"]["repeats"]
