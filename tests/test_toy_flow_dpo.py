"""Diffusion-DPO on the committed toy FLOW base (SD3-style transformer, rectified flow) through the offline trainer,
in short form, and the ``diffalign evidence flow`` report."""

from __future__ import annotations

import json

import pytest

from diffalign.toy.evidence import format_report, run_evidence
from diffalign.toy.experiment import method_config, prepare_world, train_method
from diffalign.toy.flow_experiment import evaluate_flow
from diffalign.toy.flow_pretrain import default_flow_base_path, ensure_flow_base

# Short run; the measured gain on 96 samples with these settings is in docs/toy-world.md.
SMOKE_OVERRIDES = ["train.max_steps=100", "optim.lr=1.6e-4", "train.checkpointing_steps=1000"]
SMOKE_OVERRIDES += ["train.progress_bar=false"]


def test_the_committed_flow_base_is_used_and_loads_as_sd3(tmp_path) -> None:
    assert ensure_flow_base() == default_flow_base_path()
    world = prepare_world(tmp_path, n_pairs=32, base=ensure_flow_base())
    from diffalign.models.loading import adapter_from_config
    from diffalign.models.sd3 import SD3Adapter

    adapter = adapter_from_config(method_config("flow_dpo", world).model)
    assert isinstance(adapter, SD3Adapter) and adapter.vae is None
    cond = adapter.encode_prompts(["a red circle"])
    assert cond["encoder_hidden_states"].shape == (1, 8 + 8, 128)  # 8 CLIP positions + 8 zero "T5" tokens


def test_flow_dpo_smoke_raises_colour_adherence(tmp_path) -> None:
    world = prepare_world(tmp_path, base=ensure_flow_base())
    before = evaluate_flow(world.base, n_per_prompt=8)
    run_dir, _ = train_method("flow_dpo", world, SMOKE_OVERRIDES)
    after = evaluate_flow(world.base, run_dir, n_per_prompt=8)
    assert len(after.prompts) == 96
    assert after.metrics["adherence"] >= before.metrics["adherence"] + 0.15, (before.metrics, after.metrics)


def test_flow_evidence_report_format(tmp_path) -> None:
    overrides = ["train.max_steps=2", "train.checkpointing_steps=1000", "train.progress_bar=false"]
    report = run_evidence("flow", tmp_path, methods=("flow_sft",), n_per_prompt=1, overrides=overrides)
    entry = report["methods"]["flow_sft"]
    assert {"gold_before", "gold_after", "gold_before_sde", "gold_after_sde", "diversity_after"} <= set(entry)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    table = (tmp_path / "report.md").read_text()
    assert table == format_report(report) and "SDE a=0.7" in table
    row = next(line for line in table.splitlines() if line.startswith("| flow_sft |"))
    assert row.startswith(f"| flow_sft | {entry['gold_before']:.3f} | {entry['gold_after']:.3f} |")
    assert report["checks"]["flow_sft_gain_pts_sde"] == pytest.approx(
        100 * (entry["gold_after_sde"] - entry["gold_before_sde"]), abs=1e-9
    )
