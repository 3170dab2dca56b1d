"""Run safety of the shared trainer loop (docs/runs.md): auto-resume and the refusals around it, config
compatibility, verified checkpoints with fallback, torn metrics lines, the non-finite and exploded-weight guards,
Ctrl-C, and SIGKILL at seeded random points followed by a resume with the same command."""

from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import os
import random
import re
import signal
from functools import cache
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffalign.config import Config, ConfigError, config_to_dict, parse_cli
from diffalign.trainers import checkpointing
from diffalign.trainers.base import DivergedWeightsError, TrainingInterrupted
from diffalign.trainers.checkpointing import (
    STATE_FILE,
    CheckpointError,
    build_manifest,
    list_checkpoints,
    resolve_checkpoint,
)
from diffalign.trainers.metrics import MetricsFileError, MetricsWriter, read_metrics
from diffalign.trainers.offline import OfflinePreferenceTrainer
from diffalign.trainers.resume import IncompatibleCheckpointError, OutputDirError, choose_start

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
LORA_FILE = "pytorch_lora_weights.safetensors"


@cache
def train_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_args(model: str, data: str, out: Path, *extra: str) -> list[str]:
    """scripts/train.py arguments of a tiny LoRA Diffusion-DPO run: 4 steps, a checkpoint after each (the toy
    config keeps only the newest, train.checkpoints_total_limit 1)."""
    return [
        "--config",
        str(REPO / "configs" / "toy" / "dpo.yaml"),
        f"model.pretrained={model}",
        f"data.path={data}",
        "data.cache_dir=null",
        "data.resolution=16",
        "lora.enabled=true",
        "lora.rank=4",
        "optim.lr=1e-3",
        "train.train_batch_size=2",
        f"train.max_steps={STEPS}",
        "train.checkpointing_steps=1",
        "train.progress_bar=false",
        f"train.output_dir={out}",
        *extra,
    ]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / LORA_FILE))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def reference(pixel_pipeline, pairs, tmp_path_factory) -> SimpleNamespace:
    """The uninterrupted run: its final weights and per-step losses."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_script().main(run_args(pixel_pipeline, pairs, out)) == 0
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == STEPS and losses[-1] != pytest.approx(0.6931471805599453, abs=1e-6)  # it trained
    return SimpleNamespace(out=out, weights=final_weights(out), losses=losses)


# -- where a run starts (no training) ---------------------------------------------------------------------------


def tiny_config(out: Path, **train) -> Config:
    cfg = Config()
    cfg.train.output_dir = str(out)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def fake_checkpoint(out: Path, step: int, config: Config) -> Path:
    """A complete checkpoint folder the way save_checkpoint leaves one (a weights file, the manifest last)."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.full((64,), float(step))}, str(folder / "trainable_0.safetensors"))
    state = {"global_step": step, "nonfinite_steps": 0, "config": config_to_dict(config)}
    (folder / STATE_FILE).write_text(json.dumps({**state, "files": build_manifest(folder)}))
    return folder


def test_auto_starts_fresh_resumes_or_refuses_an_earlier_run(tmp_path):
    out = tmp_path / "run"
    assert choose_start(tiny_config(out)) is None  # missing folder
    out.mkdir()
    assert choose_start(tiny_config(out)) is None  # empty folder
    (out / "config.yaml").write_text("train: {}\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(OutputDirError) as refused:
        choose_start(tiny_config(out))
    message = str(refused.value)
    assert str(out) in message and "config.yaml, metrics.jsonl" in message and "no usable checkpoint" in message
    assert "train.overwrite_output_dir=true" in message and "or a new train.output_dir" in message
    assert "\n" not in message and refused.value.exit_code == 2

    fake_checkpoint(out, 2, tiny_config(out))
    (out / "checkpoint-3.partial").mkdir()  # a killed write: removed, never resumed from
    assert choose_start(tiny_config(out)) == out / "checkpoint-2"
    assert not (out / "checkpoint-3.partial").exists()
    with pytest.raises(OutputDirError, match="resume_from_checkpoint is null"):
        choose_start(tiny_config(out, resume_from_checkpoint=None))

    assert choose_start(tiny_config(out, overwrite_output_dir=True)) is None
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # checkpoints and metrics gone
    assert choose_start(tiny_config(out, resume_from_checkpoint="latest")) is None  # latest: a fresh start


def test_latest_falls_back_over_corrupt_checkpoints_and_a_named_one_is_refused(tmp_path, caplog):
    out = tmp_path / "run"
    for step in (1, 2, 3):
        fake_checkpoint(out, step, tiny_config(out))
    newest = out / "checkpoint-3" / "trainable_0.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    middle = out / "checkpoint-2" / "trainable_0.safetensors"
    data = bytearray(middle.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    middle.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(out, "latest") == out / "checkpoint-1"
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 2
    assert str(out / "checkpoint-3") in skipped[0] and "bytes, the manifest" in skipped[0]
    assert str(out / "checkpoint-2") in skipped[1] and "sha256" in skipped[1]
    with pytest.raises(CheckpointError, match=r"checkpoint-3/trainable_0\.safetensors has \d+ bytes"):
        resolve_checkpoint(out, str(out / "checkpoint-3"))
    (out / "checkpoint-1" / STATE_FILE).write_text('{"global_step": 1, "conf')
    with pytest.raises(OutputDirError, match="no usable checkpoint"):  # auto: nothing verifies any more
        choose_start(tiny_config(out))


def test_resume_refuses_a_config_that_trains_differently(tmp_path, caplog):
    out = tmp_path / "run"
    fake_checkpoint(out, 2, tiny_config(out))
    changed = tiny_config(out)
    changed.optim.lr, changed.loss.beta = 0.01, 7.0
    with pytest.raises(IncompatibleCheckpointError) as refused:
        choose_start(changed)
    message = str(refused.value)
    assert "loss.beta: 5000.0 in the checkpoint, 7.0 now" in message
    assert "optim.lr: 1e-05 in the checkpoint, 0.01 now" in message
    assert "train.overwrite_output_dir=true" in message and "\n" not in message
    # keys that leave the trajectory alone may change (a longer run, other workers, another folder name)
    safe = tiny_config(out, max_steps=5000, checkpointing_steps=7, log_every=3, max_weight_growth=10.0)
    safe.data.num_workers = 2
    assert choose_start(safe) == out / "checkpoint-2"
    # ...but not max_steps under a schedule that depends on it
    cosine_out = tmp_path / "cosine"
    cosine = tiny_config(cosine_out)
    cosine.optim.lr_scheduler = "cosine"
    fake_checkpoint(cosine_out, 2, cosine)
    cosine.train.max_steps = 2000
    with pytest.raises(IncompatibleCheckpointError, match=r"train\.max_steps: 1000 in the checkpoint, 2000 now"):
        choose_start(cosine)
    # a checkpoint named explicitly is a deliberate change: a warning
    changed.train.resume_from_checkpoint = str(out / "checkpoint-2")
    with caplog.at_level(logging.WARNING):
        assert choose_start(changed) == out / "checkpoint-2"
    assert any("optim.lr: 1e-05 in the checkpoint, 0.01 now" in r.getMessage() for r in caplog.records)


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_one_elsewhere_named(tmp_path, caplog):
    accelerator = SimpleNamespace(is_main_process=True, log=lambda *a, **k: None)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        writer = MetricsWriter(accelerator, tmp_path, resume_step=3)
    assert any("line 3 is incomplete" in r.getMessage() for r in caplog.records)
    writer.log(3, {"loss": 0.3})
    assert [r["loss"] for r in read_metrics(tmp_path)] == [0.5, 0.4, 0.3]
    path.write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 3, "loss": 0.3}\n')
    with pytest.raises(MetricsFileError, match=r"metrics\.jsonl: line 2 is not a metrics record"):
        MetricsWriter(accelerator, tmp_path, resume_step=3)


# -- training runs ---------------------------------------------------------------------------------------------


def test_corrupt_newest_checkpoint_resumes_from_the_previous(pixel_pipeline, pairs, reference, tmp_path, capsys):
    out = tmp_path / "run"
    keep_all = "train.checkpoints_total_limit=null"
    assert train_script().main(run_args(pixel_pipeline, pairs, out, keep_all, "train.max_steps=3")) == 0
    weights = out / "checkpoint-3" / "trainable_0.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    named = run_args(pixel_pipeline, pairs, out, keep_all, f"train.resume_from_checkpoint={out / 'checkpoint-3'}")
    assert train_script().main(named) == 2
    assert f"error: train.resume_from_checkpoint: {weights} has" in capsys.readouterr().err
    assert (
        train_script().main(run_args(pixel_pipeline, pairs, out, keep_all, "train.resume_from_checkpoint=latest")) == 0
    )
    assert "resumed from step 2, trained 2 steps" in capsys.readouterr().out
    assert_same(final_weights(out), reference.weights)
    assert [r["loss"] for r in read_metrics(out)] == reference.losses


def test_rerun_refusals_through_the_script(pixel_pipeline, pairs, reference, capsys):
    """Refused before anything is built or written: the reference run is left as it was."""
    before = {p.name: p.stat().st_mtime_ns for p in reference.out.iterdir()}
    assert train_script().main(run_args(pixel_pipeline, pairs, reference.out, "train.resume_from_checkpoint=null")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {reference.out} holds an earlier run (") and err.count("\n") == 1
    assert train_script().main(run_args(pixel_pipeline, pairs, reference.out, "optim.lr=0.01")) == 2
    assert "optim.lr: 0.001 in the checkpoint, 0.01 now" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in reference.out.iterdir()} == before


def test_nonfinite_gradient_norms_are_skipped_counted_and_stop_the_run(pixel_pipeline, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    # beta 1e38: the loss is ln 2 (policy = reference at LoRA init) but every gradient norm overflows to inf
    extra = ("loss.beta=1e38", "train.max_nonfinite_steps=3", "train.max_steps=6")
    assert train_script().main(run_args(pixel_pipeline, pairs, out, *extra)) == 1
    err = capsys.readouterr().err
    assert "error: 3 consecutive non-finite steps (the last, step 3: non-finite gradient norm)" in err
    assert f"last good checkpoint: {out / 'checkpoint-2'}" in err
    records = read_metrics(out)
    assert [r["nonfinite_steps"] for r in records] == [1, 2, 3]
    assert all(r["grad_norm"] is None and r["loss"] == pytest.approx(0.6931471805599453) for r in records)
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-2"] and not (out / LORA_FILE).exists()


def test_exploding_weights_stop_the_run_before_anything_is_written(pixel_pipeline, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    # Adam's first step moves every weight with a gradient by ~lr: LoRA B goes from 0 to ~1e10
    assert train_script().main(run_args(pixel_pipeline, pairs, out, "optim.lr=1e10")) == 1
    err = capsys.readouterr().err
    assert re.search(
        r"error: step 1: max \|w\| of the trained parameters is 1e\+10, over train\.max_weight_growth", err
    )
    assert "checkpoint-1 not written and training stopped (no checkpoint was written before it)" in err
    assert not list(out.glob("checkpoint-*")) and not (out / LORA_FILE).exists()


class _PoisonedStep(OfflinePreferenceTrainer):
    """The second optimizer step leaves a NaN in a trained weight."""

    def _build_optimizer(self):
        optimizer = super()._build_optimizer()
        calls = []

        def poison(*_):
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    self.trainable_parameters()[0].view(-1)[0] = float("nan")

        optimizer.register_step_post_hook(poison)
        return optimizer


def test_nonfinite_weights_after_a_step_stop_the_run_and_name_the_last_good_checkpoint(pixel_pipeline, pairs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergedWeightsError) as stopped:
        _PoisonedStep(parse_cli(run_args(pixel_pipeline, pairs, out, "train.checkpoints_total_limit=null"))).train()
    assert str(stopped.value).startswith("step 2: trained parameters are non-finite after the optimizer step;")
    assert f"(last good checkpoint: {out / 'checkpoint-1'})" in str(stopped.value) and stopped.value.exit_code == 1
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-1"] and not (out / LORA_FILE).exists()


class _InterruptAt(OfflinePreferenceTrainer):
    """Ctrl-C during the third forward (step 3 of one micro-batch per step)."""

    def compute_loss(self, batch, epoch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return super().compute_loss(batch, epoch)


def test_ctrl_c_stops_with_one_line_closes_workers_and_resumes(pixel_pipeline, pairs, reference, tmp_path):
    out = tmp_path / "run"
    config = parse_cli(run_args(pixel_pipeline, pairs, out, "data.num_workers=1"))
    with pytest.raises(TrainingInterrupted) as stopped:
        _InterruptAt(config).train()
    assert str(stopped.value) == "interrupted at step 2 (last checkpoint: checkpoint-2); resume with the same command"
    assert stopped.value.exit_code == 130 and stopped.value.__suppress_context__  # no KeyboardInterrupt traceback
    assert multiprocessing.active_children() == []  # the DataLoader worker was shut down
    assert train_script().main(run_args(pixel_pipeline, pairs, out)) == 0  # the same command, workers aside
    assert_same(final_weights(out), reference.weights)


# -- SIGKILL at seeded random points ---------------------------------------------------------------------------

FAULT_PHASES = ("after_log", "torn_log", "in_checkpoint_write", "after_rename")


def _arm(phase: str, step: int) -> None:
    """In the doomed child: SIGKILL itself at ``phase`` of ``step`` (deterministic, unlike a timed kill).
    after_log: the step's metrics line is written, its checkpoint not; torn_log: half of that line is written;
    in_checkpoint_write: ``checkpoint-N.partial`` holds accelerate's files, not the trainer state, no rename;
    after_rename: ``checkpoint-N`` is complete, the older one not yet pruned."""

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if phase in ("after_log", "torn_log"):
        log = MetricsWriter.log

        def logged(self, s, metrics):
            log(self, s, metrics)
            if s == step:
                if phase == "torn_log":
                    data = self.path.read_bytes()
                    start = data.rstrip(b"\n").rfind(b"\n") + 1
                    self.path.write_bytes(data[: start + (len(data) - start) // 2])
                die()

        MetricsWriter.log = logged
    elif phase == "in_checkpoint_write":
        from accelerate import Accelerator

        save_state = Accelerator.save_state

        def saved(self, output_dir=None, **kwargs):
            result = save_state(self, output_dir, **kwargs)
            if Path(output_dir).name == f"checkpoint-{step}.partial":
                die()
            return result

        Accelerator.save_state = saved
    else:
        listing = checkpointing.list_checkpoints

        def listed(output_dir):  # save_checkpoint lists to prune, right after the rename
            if (Path(output_dir) / f"checkpoint-{step}" / STATE_FILE).is_file():
                die()
            return listing(output_dir)

        checkpointing.list_checkpoints = listed


def _doomed_run(argv: list[str], phase: str, step: int) -> None:
    _arm(phase, step)
    train_script().main(argv)
    os._exit(3)  # the fault never fired


def test_sigkill_at_random_points_then_the_same_command_ends_with_the_uninterrupted_weights(
    pixel_pipeline, pairs, reference, tmp_path
):
    """Each doomed run is a forked child running scripts/train.py's main (a fresh interpreter would spend ~10 s
    importing torch and diffusers on a busy 2-core runner); it SIGKILLs itself at the chosen point, after the first
    checkpoint (a run killed before any checkpoint is refused by auto and restarted with overwrite_output_dir)."""
    rng = random.Random(20240607)
    phases = rng.sample(FAULT_PHASES, len(FAULT_PHASES)) + [rng.choice(FAULT_PHASES)]  # each phase at least once
    points = [(phase, rng.randint(2, STEPS)) for phase in phases]
    fork = multiprocessing.get_context("fork")
    for i, (phase, step) in enumerate(points):
        out = tmp_path / f"run{i}"
        argv = run_args(pixel_pipeline, pairs, out)
        child = fork.Process(target=_doomed_run, args=(argv, phase, step))
        child.start()
        child.join(timeout=300)
        assert child.exitcode == -signal.SIGKILL, (phase, step, child.exitcode)
        assert not (out / LORA_FILE).exists()
        assert train_script().main(argv) == 0, (phase, step)
        assert_same(final_weights(out), reference.weights)
        assert [r["loss"] for r in read_metrics(out)] == reference.losses, (phase, step)
        assert list_checkpoints(out)[-1].name == f"checkpoint-{STEPS}" and not list(out.glob("*.partial"))


def test_sail_rounds_carry_on_and_its_overwrite_clears_the_earlier_loop(tmp_path):
    from diffalign.trainers.sail import _clear_rounds, _round_config

    loop = tiny_config(tmp_path, overwrite_output_dir=True)
    one = _round_config(loop, pretrained=tmp_path, data="pairs", output_dir=tmp_path / "round_1" / "train", steps=2)
    assert one.train.resume_from_checkpoint == "latest" and one.train.overwrite_output_dir is False
    (tmp_path / "round_0" / "train").mkdir(parents=True)
    (tmp_path / "round_1").mkdir()
    (tmp_path / "final_model.txt").write_text("round_1/model\n")
    (tmp_path / "notes.txt").write_text("not the loop's")
    _clear_rounds(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_toy_runs_retrain_and_their_later_segments_resume():
    """The toy configs put RETRAIN before the caller's overrides; a later segment's overrides must win over it
    (overwrite together with latest is a config error)."""
    from diffalign.config import load_config
    from diffalign.toy import RETRAIN
    from diffalign.toy.experiment import CONFIG_DIR, segment_overrides

    def train_section(*overrides):
        return load_config(CONFIG_DIR / "dpo.yaml", [RETRAIN, *overrides]).train

    assert train_section().overwrite_output_dir is True
    first, later = train_section(*segment_overrides(2, [2, 4])), train_section(*segment_overrides(4, [2, 4]))
    assert (first.overwrite_output_dir, first.resume_from_checkpoint, first.max_steps) == (True, "auto", 2)
    assert (later.overwrite_output_dir, later.resume_from_checkpoint, later.max_steps) == (False, "latest", 4)
    with pytest.raises(ConfigError, match="train.overwrite_output_dir=true starts afresh"):
        train_section("train.resume_from_checkpoint=latest")
