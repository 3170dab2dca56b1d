"""The parts of ``scripts/bench_offline.py`` (usage and method are documented there), one job per module:

* :mod:`.common`: repository paths, the hyper-parameters every contender shares, ``Settings``, ``Contender`` and the
  environment of the subprocesses;
* :mod:`.assets`: the tiny SD pipeline and the Pick-a-Pic-like parquet (``--worker prepare``);
* :mod:`.contenders`: how ``ours_cached``, ``ours_uncached``, the floor and diffusers' script are launched and checked;
* :mod:`.floor`: the floor's bare training loop on tensors in memory (``--worker floor``);
* :mod:`.measure`: the priming, short and long runs and their per-step seconds, CPU time and peak RSS;
* :mod:`.report`: ratios, targets and the printed table of the LoRA benchmark;
* :mod:`.parity`: loss parity with the floor and the LoRA comparison with diffusers;
* :mod:`.full_ft`: the ``--full-ft`` memory benchmark (frozen copy vs precomputed reference vs SFT).

Nothing here imports torch or numpy at module level: the measuring process must stay small (see
:func:`.assets.prepare_assets`); the workers import them inside their functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/bench_offline.py` without an installed package
    sys.path.insert(0, str(REPO_ROOT))
