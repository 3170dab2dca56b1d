"""Pick the trainer a config asks for (``scripts/train.py``, ``diffalign train``)."""

from __future__ import annotations

from diffalign.config import Config
from diffalign.trainers.base import TrainResult


def train(config: Config) -> TrainResult:
    """Train with the method of ``config.train.method``: diffusion offline methods (pairwise, SFT, SOAR, SAIL),
    diffusion group RL (grpo) or direct reward back-propagation (direct_reward, D²-Align), or causal-LM preference /
    GRPO."""
    method, llm = config.train.method, config.model.backbone == "causal_lm"
    if method == "preference":
        from diffalign.trainers.llm_preference import LLMPreferenceTrainer as trainer
    elif method == "grpo" and llm:
        from diffalign.trainers.llm_grpo import LLMGRPOTrainer as trainer
    elif method == "grpo":
        from diffalign.trainers.diffusion_grpo import DiffusionGRPOTrainer as trainer
    elif method == "sail":
        from diffalign.trainers.sail import run_sail

        return run_sail(config)
    elif method == "sft":
        from diffalign.trainers.sft import SFTTrainer as trainer
    elif method == "soar":
        from diffalign.trainers.soar import SOARTrainer as trainer
    elif method == "direct_reward":
        from diffalign.trainers.direct_reward import direct_reward_trainer as trainer
    else:
        from diffalign.trainers.offline import OfflinePreferenceTrainer as trainer
    return trainer(config).train()
