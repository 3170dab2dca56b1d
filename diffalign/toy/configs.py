"""The ``configs/toy`` files every toy experiment trains from, and how a run of one is configured."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from diffalign.config import Config, load_config
from diffalign.toy import RETRAIN

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "toy"


def toy_run_config(
    name: str,
    pretrained: str | os.PathLike,
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
) -> Config:
    """``configs/toy/{name}.yaml`` training ``pretrained`` on ``data`` into ``output_dir``, retrained from scratch on
    a rerun (:data:`~diffalign.toy.RETRAIN`); ``overrides`` come last, so they may change any of it."""
    return load_config(
        CONFIG_DIR / f"{name}.yaml",
        [
            f"model.pretrained={pretrained}",
            f"data.path={data}",
            f"train.output_dir={output_dir}",
            RETRAIN,  # a rerun retrains (see diffalign.toy.RETRAIN)
            *overrides,
        ],
    )
