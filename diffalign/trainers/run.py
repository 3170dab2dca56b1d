"""Pick the trainer a config asks for (``scripts/train.py``, ``diffalign train``)."""

from __future__ import annotations

from diffalign.config import Config
from diffalign.trainers.base import TrainResult


def train(config: Config) -> TrainResult:
    """Train with the method of ``config.train.method``: diffusion offline methods, or causal-LM preference / GRPO."""
    method = config.train.method
    if method == "preference":
        from diffalign.trainers.llm_preference import LLMPreferenceTrainer as trainer
    elif method == "grpo":
        from diffalign.trainers.llm_grpo import LLMGRPOTrainer as trainer
    else:
        from diffalign.trainers.offline import OfflinePreferenceTrainer as trainer
    return trainer(config).train()
