"""Atomic checkpoints: a checkpoint directory either exists complete or not at all.

Each checkpoint is written by ``accelerator.save_state`` into ``checkpoint-N.partial`` and renamed to ``checkpoint-N``
only after every process has finished writing and ``trainer_state.json`` is in place, so a crash mid-write never
leaves a checkpoint that ``resume_from_checkpoint: latest`` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``None`` → no resume; ``"latest"`` → newest complete checkpoint (or ``None`` if there is none); else a path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"train.resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE}); "
            f"use 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)]}"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    total_limit: int | None = None,
    *,
    write_shards: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically: ``accelerator.save_state`` (and ``write_shards(folder)``, run on every
    process, for state accelerate does not hold: FSDP2's sharded model and optimizer) into ``.partial``, then the
    trainer state, then the rename; keep the newest ``total_limit``."""
    final = Path(output_dir) / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if write_shards is not None:
        write_shards(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp_state = partial / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(state, indent=2))
        os.replace(tmp_state, partial / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())
