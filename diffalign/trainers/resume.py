"""Where a run starts (``train.resume_from_checkpoint``, ``train.overwrite_output_dir``): rerunning a command never
destroys the run already in its output folder. See docs/runs.md.

* ``auto`` (default): resume from the newest checkpoint that verifies; an output folder that holds an earlier run but
  no usable checkpoint is refused; an empty or missing folder starts afresh.
* ``latest``: the newest checkpoint that verifies, else a fresh start. A path: that checkpoint, which must verify.
* ``null``: a fresh start, refused over an earlier run.
* ``overwrite_output_dir: true``: the earlier run's checkpoints and ``metrics.jsonl`` are removed and training starts
  at step 0 (so ``checkpoints_total_limit`` never prunes the new run's checkpoints for older, higher numbers).

``auto`` and ``latest`` resume only under a config that continues the same trajectory: keys outside
:data:`RESUME_SAFE_KEYS` must equal the values stored in the checkpoint's ``trainer_state.json`` (a checkpoint named
by path resumes with a warning listing the differences).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffalign.config import Config, TrainConfig, config_to_dict
from diffalign.errors import DiffalignError
from diffalign.trainers.checkpointing import read_state, resolve_checkpoint

logger = logging.getLogger(__name__)

# Keys a resumed run may change: they decide how long the run goes, where and how it is logged, checkpointed and
# guarded, and how batches reach the device, never which batches, which draws or which updates. train.max_steps
# extends or shortens the run; a learning-rate schedule that depends on it (anything but constant /
# constant_with_warmup) is refused below, since the resumed curve would not be the one a run of the new length has.
RESUME_SAFE_KEYS = frozenset(
    {
        "train.max_steps",
        "train.checkpointing_steps",
        "train.checkpoints_total_limit",
        "train.log_every",
        "train.report_to",
        "train.tracker_project_name",
        "train.run_name",
        "train.progress_bar",
        "train.output_dir",
        "train.resume_from_checkpoint",
        "train.overwrite_output_dir",
        "train.max_nonfinite_steps",
        "train.max_weight_growth",
        "data.num_workers",
        "data.pin_memory",
        "data.persistent_workers",
        "data.prefetch_factor",
    }
)
STEP_FREE_SCHEDULES = ("constant", "constant_with_warmup")

# What an earlier run leaves in its output folder besides checkpoints: the config and metrics every run writes, and
# the final weights of each trainer (LoRA / peft / full ``save_pretrained`` / a denoiser folder / a D²-Align
# correction)
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "pytorch_lora_weights.safetensors",
    "adapter_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "unet",
    "transformer",
    "correction.safetensors",
)
_MISSING = object()


class OutputDirError(DiffalignError):
    """``train.output_dir`` holds an earlier run that this config would start over."""


class IncompatibleCheckpointError(DiffalignError):
    """The checkpoint to resume from was written under a config that trains differently."""


def earlier_run_files(output_dir: str | os.PathLike) -> list[str]:
    """Names in ``output_dir`` that an earlier run left (checkpoints, complete or not, included), sorted."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name in RUN_FILES or p.name.startswith("checkpoint-"))


def clear_earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """Remove every ``checkpoint-*`` folder and ``metrics.jsonl`` of ``output_dir``; returns the names removed."""
    root = Path(output_dir)
    removed = [n for n in earlier_run_files(root) if n.startswith("checkpoint-") or n == "metrics.jsonl"]
    for name in removed:
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> None:
    """Drop ``checkpoint-N.partial`` folders: writes a killed run never finished, which nothing can resume from."""
    root = Path(output_dir)
    for path in root.glob("checkpoint-*.partial") if root.is_dir() else ():
        logger.warning("removing %s: an unfinished checkpoint write of an earlier, stopped run", path)
        shutil.rmtree(path, ignore_errors=True)


def _sections(config: Mapping[str, Any]) -> dict[str, Any]:
    """``section.field`` -> value (JSON-normalised: tuples become lists) of a config dict."""
    plain = json.loads(json.dumps(config, default=str))
    return {f"{s}.{k}": v for s, fields in plain.items() if isinstance(fields, dict) for k, v in fields.items()}


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, checkpoint's value, current value) for each key that changes the run's trajectory. A key the
    checkpoint does not record (it predates the key) counts only if the current value is not the default."""
    old, new, default = _sections(stored), _sections(current), _sections(config_to_dict(Config()))
    safe = set(RESUME_SAFE_KEYS)
    schedules = {old.get("optim.lr_scheduler"), new.get("optim.lr_scheduler")}
    if not schedules <= set(STEP_FREE_SCHEDULES):
        safe.discard("train.max_steps")
    out = []
    for key, value in new.items():
        before = old.get(key, _MISSING)
        if key in safe or before == value or (before is _MISSING and value == default.get(key, _MISSING)):
            continue
        out.append((key, "(not recorded)" if before is _MISSING else before, value))
    return out


def check_compatible(
    checkpoint: Path, stored: Mapping[str, Any], current: Mapping[str, Any], *, strict: bool = True
) -> None:
    """:class:`IncompatibleCheckpointError` naming each differing key with both values, and what to do; with
    ``strict=False`` (a checkpoint named explicitly: a deliberate change, e.g. a lower lr after a guard stopped the
    run) a warning instead."""
    differences = config_differences(stored, current)
    if not differences:
        return
    listed = "; ".join(
        f"{k}: {json.dumps(a)} in the checkpoint, {json.dumps(b)} now"
        + (" (optim.lr_scheduler depends on it)" if k == "train.max_steps" else "")
        for k, a, b in differences
    )
    if not strict:
        logger.warning("resuming from %s with a changed config (%s): the run continues differently", checkpoint, listed)
        return
    raise IncompatibleCheckpointError(
        f"cannot resume from {checkpoint}: it was trained with a different config ({listed}); set the checkpoint's "
        "values again, or start a new run (train.overwrite_output_dir=true or a new train.output_dir; "
        f"train.resume_from_checkpoint={checkpoint} continues from it with the new values)"
    )


def choose_start(config: Config) -> Path | None:
    """The checkpoint the run resumes from (``None``: step 0), after removing what ``overwrite_output_dir`` replaces.
    Raises :class:`OutputDirError`, :class:`IncompatibleCheckpointError` or ``CheckpointError``. Main process only:
    it reads and changes the output folder."""
    tc: TrainConfig = config.train
    root = Path(tc.output_dir)
    if tc.overwrite_output_dir:
        removed = clear_earlier_run(root)
        if removed:
            logger.warning("train.overwrite_output_dir: removed %s from %s", ", ".join(removed), root)
        return None
    remove_partial_checkpoints(root)
    mode = tc.resume_from_checkpoint
    checkpoint = resolve_checkpoint(root, mode)
    if checkpoint is None and mode in ("auto", None):
        found = earlier_run_files(root)
        if found:
            raise OutputDirError(_refusal(root, found, mode))
    if checkpoint is not None:
        stored = read_state(checkpoint).get("config", {})
        check_compatible(checkpoint, stored, config_to_dict(config), strict=mode in ("auto", "latest"))
    return checkpoint


def _refusal(root: Path, found: list[str], mode: str | None) -> str:
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if mode == "auto":
        why = f"{root} holds an earlier run ({shown}) but no usable checkpoint to resume from"
    else:
        why = f"{root} holds an earlier run ({shown}) and train.resume_from_checkpoint is null (a fresh start)"
    return f"{why}; set train.overwrite_output_dir=true to replace it, or a new train.output_dir"
