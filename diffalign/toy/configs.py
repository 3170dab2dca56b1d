"""The ``configs/toy`` files every toy experiment trains from, and how a run of one is configured."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from diffalign.config import Config, load_config
from diffalign.config_fields import ConfigError
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
    a rerun (:data:`~diffalign.toy.RETRAIN`); ``overrides`` come last, so they may change any of it.

    An override ``NAME:key=value`` applies only to ``configs/toy/NAME.yaml`` (e.g. ``flow_grpo:online.clip_range=1e-2``
    widens plain Flow-GRPO's clip in a run that also trains GRPO-Guard); plain ``key=value`` applies to every config."""
    return load_config(
        CONFIG_DIR / f"{name}.yaml",
        [
            f"model.pretrained={pretrained}",
            f"data.path={data}",
            f"train.output_dir={output_dir}",
            RETRAIN,  # a rerun retrains (see diffalign.toy.RETRAIN)
            *overrides_for(name, overrides),
        ],
    )


def overrides_for(name: str, overrides: Sequence[str]) -> list[str]:
    """The ``overrides`` that apply to ``configs/toy/{name}.yaml``: unscoped ones and those scoped ``{name}:``."""
    check_override_scopes(overrides)
    chosen = []
    for override in overrides:
        scope, _, scoped = override.partition(":") if _scoped(override) else ("", "", override)
        if scope in ("", name):
            chosen.append(scoped)
    return chosen


def check_override_scopes(overrides: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for an override scoped to a name that is no ``configs/toy`` file (a typo would
    otherwise silently change nothing)."""
    for override in overrides:
        if _scoped(override):
            scope = override.partition(":")[0]
            if not (CONFIG_DIR / f"{scope}.yaml").is_file():
                raise ConfigError(
                    f"override {override!r}: there is no configs/toy/{scope}.yaml; scope it to a method name"
                )


def _scoped(override: str) -> bool:
    return ":" in override.split("=", 1)[0]  # keys have no ':'; values (paths) may
