"""Per-optimizer-step metrics: ``metrics.jsonl`` in the output directory plus any accelerate trackers."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from diffalign.errors import DiffalignError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# accelerate passes train.tracker_project_name as each tracker's project; the run name goes in the keyword its
# tracker's init takes (accelerate/tracking.py). tensorboard and aim have no run name of their own (tensorboard logs to
# train.output_dir/<project>, aim names the run after the project), comet_ml takes it only through an
# ExperimentConfig, dvclive ignores it.
RUN_NAME_KWARGS = {
    "wandb": "name",  # wandb.init(project, name)
    "trackio": "name",  # trackio.init(project, name)
    "mlflow": "run_name",  # MLflowTracker(experiment_name, ..., run_name)
    "clearml": "task_name",  # Task.init(project_name, task_name)
    "swanlab": "experiment_name",  # swanlab.init(project, experiment_name)
}


class MetricsFileError(DiffalignError):
    """A line of ``metrics.jsonl`` other than a torn last one is not a metrics record."""


class MetricsWriter:
    """Appends one JSON line per logged step (main process only) and forwards to ``accelerator.log``.

    On resume the file is truncated to the steps at or before the checkpoint, so the log reads like one
    uninterrupted run; a torn last line (a run killed mid-write) is dropped with a warning.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | os.PathLike, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            resumed = resume_step is not None and self.path.exists()
            kept = [r for r in parse_metrics(self.path) if r["step"] <= resume_step] if resumed else []
            if kept:
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                os.replace(tmp, self.path)
            elif self.path.exists():
                self.path.unlink()

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


def parse_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``. A last line that is not JSON (torn by a kill mid-write) is dropped with a
    warning; any other line that is not a record with an integer ``step`` is a :class:`MetricsFileError`."""
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: line %d is incomplete (a run stopped mid-write); dropped", path, number)
                break
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsFileError(
                f"{path}: line {number} is not a metrics record (JSON with an integer 'step'); fix or delete the "
                "line, or remove the file"
            )
        records.append(record)
    return records


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return parse_metrics(Path(output_dir) / METRICS_FILE)


def run_name(name: str | None, output_dir: str | os.PathLike) -> str:
    """``train.run_name``, or the name of the output folder when it is null (TrainingArguments' default)."""
    return name if name is not None else Path(output_dir).resolve().name


def tracker_init_kwargs(name: str) -> dict[str, dict[str, str]]:
    """``init_kwargs`` for ``Accelerator.init_trackers`` that give each tracker taking a run name ``name``;
    accelerate reads only the entries of the trackers in use."""
    return {tracker: {key: name} for tracker, key in RUN_NAME_KWARGS.items()}
