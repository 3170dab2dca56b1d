"""Score folders of generated images and compare two models (win rate with a bootstrap interval).

    python scripts/evaluate.py --images DIR [--images-b DIR] [--rewards clip_score,toy_gold,...] \
        [--reward-options JSON] [--bootstrap 1000] --output-dir OUT

Folders are those written by ``scripts/generate.py`` (PNG + ``metadata.jsonl``). Writes ``OUT/report.md``,
``scores.csv`` (one row per image), ``per_prompt.csv``, ``summary.json``, image grids and plots (PNG). The logic is
in :mod:`diffalign.eval.evaluation`.

Out of scope: a GenEval-style prompt set with its object-detector checker (no detector can be loaded from local
files here); for the toy world the pixel-exact gold metric (``toy_gold``) plays that role.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diffalign.eval.cli import evaluate_main  # noqa: E402
from diffalign.utils.cli_errors import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(evaluate_main))  # error: <message> and its exit status; --debug for the traceback
