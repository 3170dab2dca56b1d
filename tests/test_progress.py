"""The start-up summary (main process only, printed before the first step) and the progress bar's micro-batch
postfix, which keeps a long gradient accumulation visibly moving."""

from __future__ import annotations

import re

from test_data_loader import config, pairs  # noqa: F401 - its 20 px pairs fixture

from diffalign.trainers.offline import train
from diffalign.trainers.progress import StepProgress, count, format_summary


def test_summary_block_aligns_its_rows() -> None:
    text = format_summary("Running training", [("examples", "16"), ("effective batch", "8")])
    assert text.splitlines() == ["***** Running training *****", "  examples         16", "  effective batch  8"]
    assert (count(1234), count(2_500_000), count(3e9)) == ("1,234", "2.50M", "3.00B")


def test_progress_postfix_counts_micro_batches_within_a_step() -> None:
    progress = StepProgress(10, 2, 128, enabled=True, refresh_s=0.0)
    progress.micro_batch(37)
    assert progress.bar.postfix == "micro=37/128" and progress.bar.n == 2
    progress.micro_batch(128)
    progress.step(0.25)
    assert progress.bar.n == 3 and "loss=0.2500" in progress.bar.postfix
    progress.close()


def test_a_run_prints_its_summary_before_training(pixel_pipeline, pairs, tmp_path, capsys) -> None:  # noqa: F811
    cfg = config(pixel_pipeline, pairs, tmp_path / "run", workers=0, max_steps=1)
    train(cfg)
    out = capsys.readouterr().out
    assert out.startswith("***** Running training: dpo (OfflinePreferenceTrainer) *****")
    rows = dict(re.findall(r"^  (\S.*?\S)  +(.*)$", out, flags=re.M))
    assert rows["model"] == f"{pixel_pipeline} (SDAdapter)"
    assert rows["examples"] == "16" and rows["batch per device"] == "2" and rows["accumulation"] == "2"
    assert rows["processes"] == "1 (single process)" and rows["effective batch"] == "4"
    assert rows["optimizer steps"] == "1 (0.25 epochs)"
    assert re.fullmatch(r"\S+ of \S+ \(LoRA rank 4\)", rows["trainable parameters"])
    assert rows["output"] == str(tmp_path / "run") and "resumed from" not in rows
    cfg.train.max_steps, cfg.train.resume_from_checkpoint = 2, "latest"
    train(cfg)
    rows = dict(re.findall(r"^  (\S.*?\S)  +(.*)$", capsys.readouterr().out, flags=re.M))
    assert rows["resumed from"] == "step 1 (checkpoint-1)"


def test_cached_data_is_read_in_the_training_process(pixel_pipeline, pairs, tmp_path, capsys) -> None:  # noqa: F811
    cfg = config(pixel_pipeline, pairs, tmp_path / "run", workers=2, max_steps=1)
    cfg.data.random_crop, cfg.data.cache_dir = False, str(tmp_path / "cache")  # the cache fixes the crop
    train(cfg)
    rows = dict(re.findall(r"^  (\S.*?\S)  +(.*)$", capsys.readouterr().out, flags=re.M))
    assert rows["data loader workers"] == "0 (cached data reads in place; data.num_workers=2)"
