"""Generate evaluation images from a diffusion model (SD 1.x/2.x, SDXL, SD3, the toy bases), resumably.

    python scripts/generate.py --model PATH_OR_HUB_ID [--weights RUN_DIR] --prompts FILE_OR_DATASET \
        [--n-per-prompt 4] [--seed 0] [--steps 20] [--guidance-scale 4.5] [--sampler ode|ddim|sde] \
        [--resolution N] [--batch-size 8] --output-dir DIR

Writes ``DIR/p<prompt>_s<sample>.png``, ``DIR/metadata.jsonl`` (one line per image: file, prompt, prompt_index,
sample_index, seed, noise_index) and ``DIR/generation.json``. Sample ``s`` of prompt ``p`` always starts from the
noise of ``(seed, p·10⁶ + s)``; a rerun skips the images already present and produces identical files. The logic
is in :mod:`diffalign.eval.generation`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diffalign.eval.cli import generate_main  # noqa: E402
from diffalign.utils.cli_errors import run_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(generate_main))  # error: <message> and its exit status; --debug for the traceback
