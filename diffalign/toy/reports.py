"""Where every ``diffalign evidence`` family writes its report."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def write_report(output_dir: str | os.PathLike, report: dict, format_report: Callable[[dict], str]) -> None:
    """``report.json`` and ``report.md`` (``format_report(report)``) of an evidence run, in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(format_report(report))
