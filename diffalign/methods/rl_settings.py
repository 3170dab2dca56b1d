"""The ``online`` section's fields every online method reads (the rewards: :class:`RewardSettings`) and those of
group RL on diffusion models and causal LMs alike (group size, advantage, KL weight: :class:`GroupSettings`), with
the checks they share. Names and defaults follow TRL's ``GRPOConfig`` where one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffalign.config_fields import Checker, setting

ADVANTAGES = "diffalign.losses.advantages:ADVANTAGE_METHODS"


@dataclass
class RewardSettings:
    """Online methods (train.method grpo, direct_reward): the rewards."""

    # causal LMs: "module:function" or "path/to/file.py:function", called as fn(prompts=[...], completions=[...],
    # **columns) -> list of floats (TRL's reward-function signature). Diffusion: reward models of diffalign.rewards
    # (clip_score, pickscore, hpsv2, aesthetic, jpeg_compressibility, a plugin's) or "module:callable" returning one.
    # Several are summed with reward_weights.
    reward_functions: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None


@dataclass
class GroupSettings(RewardSettings):
    """Group RL (train.method grpo): how a group's rewards become advantages."""

    num_generations: int = 8  # completions / images per prompt (a group); MC-GRPO samples one more as its pivot
    # "group" | "batch" | "none" (TRL scale_rewards) | "rloo" | "mc_grpo" | "bnpo" | "best_of_k" (RAFT)
    advantage: str = setting("group", choices=ADVANTAGES)
    beta: float = setting(0.0, ge=0)  # k3 KL to the reference (TRL default 0: no reference forward)


def no_loss_keys(c: Checker) -> None:
    """A method whose objective is its ``online`` section takes no ``loss.name`` / ``loss.beta`` (a saved config
    repeats the defaults: only a changed value is an error)."""
    defaults = type(c.config.loss)()
    for key in ("loss.name", "loss.beta"):
        if c.changed(key, getattr(defaults, key.split(".")[1])):
            c.fail(
                key,
                f"train.method '{c.config.train.method}' takes its objective from the 'online' section; remove '{key}'",
            )


def no_precomputed_reference(c: Checker) -> None:
    """GRPO's KL reference sees fresh rollouts, which a reference precomputed on a data set cannot cover."""
    if c.config.train.reference == "precomputed":
        c.fail(
            "train.reference",
            "train.reference 'precomputed' stores values of a fixed data set, but GRPO evaluates its KL reference on "
            "fresh rollouts; use train.reference=auto (or frozen_copy_offload under full fine-tuning)",
        )
