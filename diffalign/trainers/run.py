"""Start the trainer a config asks for (``scripts/train.py``, ``diffalign train``): the registered method of
``train.method`` in the backbone's family (:mod:`diffalign.methods`) names it."""

from __future__ import annotations

from diffalign.config import Config, method_of
from diffalign.trainers.base import TrainResult


def train(config: Config) -> TrainResult:
    """Train with the method of ``config.train.method`` (diffusion offline methods, SOAR, SAIL, group RL, direct
    reward; causal-LM preference optimisation and GRPO), as its registration says."""
    method = method_of(config)
    if method is None:
        raise ValueError(
            f"train.method '{config.train.method}' is not a registered method for model.backbone "
            f"'{config.model.backbone}'; validate the config with diffalign.config.validate_config first"
        )
    return method.run(config)
