"""Causal-LM methods (``model.backbone: causal_lm``): ``preference`` (any registered loss; its kind picks the data
layout: pairs, rankings or unpaired labels; TRL's DPO family and the rest of the loss core) and ``grpo`` (online
group RL with TRL's GRPOConfig names: generation, clipping ``epsilon`` / ``epsilon_high``, aggregation
``loss_type``, GSPO's sequence-level ratio).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from diffalign.config_fields import Checker, setting
from diffalign.methods import Method, register_method
from diffalign.methods.rl_settings import GroupSettings, no_loss_keys, no_precomputed_reference


@dataclass
class LLMGRPOSettings(GroupSettings):
    """train.method grpo on a causal LM (TRL 1.16 GRPOConfig names and defaults)."""

    max_new_tokens: int = setting(64, ge=1)  # TRL max_completion_length
    temperature: float = setting(1.0, gt=0)
    top_p: float = setting(1.0, gt=0, le=1)
    top_k: int = setting(0, ge=0, note="0 = off")  # 0 = off: samples from the model's distribution
    epsilon: float = setting(0.2, ge=0)  # PPO clip of the token ratio (diffusion GRPO: online.clip_range)
    epsilon_high: float | None = setting(None, ge=0)  # null = epsilon; DAPO uses 0.28
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"  # TRL's aggregations
    importance_sampling_level: Literal["token", "sequence"] = "token"  # token | sequence (GSPO)


def _validate_grpo(c: Checker) -> None:
    o = c.config.online
    no_loss_keys(c)
    c.check("online.reward_functions", bool(o.reward_functions), "at least one 'module:function' reward")
    if o.reward_weights is not None and len(o.reward_weights) != len(o.reward_functions):
        c.fail(
            "online.reward_weights",
            f"{len(o.reward_weights)} weights for {len(o.reward_functions)} reward functions; give one per function "
            "or null (all 1)",
        )
    c.check("online.num_generations", o.num_generations >= 2, ">= 2 (advantages compare completions of a prompt)")
    no_precomputed_reference(c)


def preference_losses(registry: Mapping[str, Any]) -> tuple[str, ...]:
    """Every registered loss a causal LM can train: all kinds, and of the chosen-only ones SFT."""
    return tuple(sorted(n for n, fn in registry.items() if getattr(fn, "kind", None) != "chosen_only" or n == "sft"))


_PREFERENCE = "diffalign.trainers.llm_preference:LLMPreferenceTrainer"  # any registered loss: TRL's DPO family, ...
_GRPO = "diffalign.trainers.llm_grpo:LLMGRPOTrainer"  # MC-GRPO, BNPO, RLOO, ... advantages; DAPO, GSPO

register_method(Method("preference", "llm", _PREFERENCE, default_loss="trl_sigmoid", losses=preference_losses))
register_method(Method("grpo", "llm", _GRPO, sections={"online": (LLMGRPOSettings,)}, validate=_validate_grpo))
