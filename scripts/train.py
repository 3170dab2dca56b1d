"""Preference training from a YAML config: Diffusion-DPO, DCPO, MaPO, SFT (diffusion) or causal-LM preference / GRPO.

Usage::

    python scripts/train.py --config configs/sd15_diffusion_dpo.yaml train.max_steps=10 lora.enabled=true
    accelerate launch --num_processes 8 scripts/train.py --config configs/sd21_dcpo.yaml
    python scripts/train.py --config configs/sd15_mapo.yaml --print-config    # print the resolved config, exit

Overrides are dotted ``key=value`` pairs read as YAML and applied after the file (see ``diffalign.config``):
``optim.lr=1e-5``, ``train.report_to=[tensorboard]``, ``model.revision=null``, ``loss.params.alpha=1.0``.
``--debug`` shows the traceback of an error (otherwise one ``error:`` line; see docs/cli.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from diffalign.config import parse_cli
from diffalign.utils.cli_errors import run_cli

if TYPE_CHECKING:
    from diffalign.trainers.base import TrainResult


def main(argv: Sequence[str] | None = None) -> int:
    """Train; a config, data, model or checkpoint error prints ``error: <message>`` (traceback with ``--debug``)."""
    return run_cli(_train, argv)


def _train(argv: list[str]) -> int:
    config = parse_cli(argv)
    from diffalign.trainers.run import train  # imported late: --help, --print-config and config errors stay fast

    result = train(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(summary_line(result))
    return 0


SUMMARY_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "reward_mean", "gold")


def summary_line(result: TrainResult) -> str:
    """One line for the end of a run: steps (and the step it resumed from), time, where the weights are, the last
    logged values worth a glance."""
    last = ", ".join(f"{k} {result.last_metrics[k]:.4g}" for k in SUMMARY_METRICS if k in result.last_metrics)
    start = result.resumed_from
    steps = (f"resumed from step {start}, trained {result.global_step - start} steps" if start is not None
             else f"trained {result.global_step} steps")
    return (f"{steps} in {result.seconds:.1f} s ({result.nonfinite_steps} non-finite) "
            f"-> {result.output_dir}" + (f"; last step: {last}" if last else ""))


if __name__ == "__main__":
    sys.exit(main())
