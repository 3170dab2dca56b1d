"""Per-optimizer-step metrics: ``metrics.jsonl`` in the output directory plus any accelerate trackers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator


class MetricsWriter:
    """Appends one JSON line per logged step (main process only) and forwards to ``accelerator.log``.

    On resume the file is truncated to the steps at or before the checkpoint, so the log reads like one
    uninterrupted run.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept: list[str] = []
            if resume_step is not None and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            elif self.path.exists():
                self.path.unlink()
            if kept:
                self.path.write_text("\n".join(kept) + "\n")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        self.accelerator.log(clean, step=step)
        if self.accelerator.is_main_process:
            record = {
                "step": step,
                **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()},
            }
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
