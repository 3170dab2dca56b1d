"""Atomic, verifiable checkpoints: a checkpoint directory either exists complete or not at all, and a damaged one is
recognised before it is loaded.

Each checkpoint is written by ``accelerator.save_state`` into ``checkpoint-N.partial`` and renamed to ``checkpoint-N``
only after every process has finished writing and ``trainer_state.json`` is in place, so a crash mid-write never
leaves a checkpoint that ``resume_from_checkpoint: latest`` would pick up. ``trainer_state.json``, written last, holds
a manifest (``files``: each file's size and sha256); :func:`verify_checkpoint` checks it, and ``latest`` / ``auto`` fall
back over checkpoints that fail (a truncated or overwritten file, a lost one) to the newest that verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from diffalign.errors import DiffalignError

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_KEY = "files"  # in trainer_state.json: {relative path: {"size": bytes, "sha256": hex digest}}
_HASH_CHUNK = 1 << 20


class CheckpointError(DiffalignError):
    """A checkpoint named by ``train.resume_from_checkpoint`` is missing, incomplete or damaged."""


def checkpoint_step(path: str | os.PathLike) -> int:
    """N of a ``checkpoint-N`` folder."""
    m = _CHECKPOINT_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint-N folder")
    return int(m.group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir`` (renamed into place, with ``trainer_state.json``), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` except the trainer state itself."""
    manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (STATE_FILE, STATE_FILE + ".tmp"):
            manifest[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return manifest


def read_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of ``checkpoint``; :class:`CheckpointError` naming the file if it is not readable."""
    path = checkpoint / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {checkpoint} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"{path} has no integer global_step; the checkpoint is damaged")
    return state


def verify_checkpoint(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (naming the file), or ``None`` if every file of its manifest is
    there with its size and sha256. A checkpoint written before manifests existed verifies with a warning."""
    checkpoint = Path(checkpoint)
    try:
        state = read_state(checkpoint)
    except CheckpointError as err:
        return str(err)
    manifest = state.get(MANIFEST_KEY)
    if manifest is None:
        logger.warning("%s has no file manifest (written by an older diffalign): files not verified", checkpoint)
        return None
    for rel, expected in manifest.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in {checkpoint / STATE_FILE}"
    return None


def newest_valid_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` that verifies, warning about each newer one skipped."""
    for checkpoint in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("skipping %s: %s", checkpoint, problem)
    return None


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``None`` → no resume; ``"latest"`` / ``"auto"`` → the newest checkpoint that verifies (or ``None``); else a
    path, which must verify (:class:`CheckpointError` naming the file otherwise)."""
    if resume_from is None:
        return None
    if resume_from in ("latest", "auto"):
        return newest_valid_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"train.resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE}); "
            f"use 'auto', 'latest' or one of {[str(p) for p in list_checkpoints(output_dir)]}"
        )
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(
            f"train.resume_from_checkpoint: {problem}; resume from an earlier checkpoint or with 'latest'"
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
    trainer state with the manifest of every file, then the rename; keep the newest ``total_limit`` checkpoints at
    or before ``step`` (a higher-numbered one, left by a run this one resumed behind, is replaced when reached)."""
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
        state = {**state, MANIFEST_KEY: build_manifest(partial)}
        tmp_state = partial / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(state, indent=2))
        os.replace(tmp_state, partial / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            done = [c for c in list_checkpoints(output_dir) if checkpoint_step(c) <= step]
            for old in done[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    accelerator.load_state(str(checkpoint))
    return read_state(checkpoint)
