"""``sail`` (SAIL, arXiv 2602.05380): rounds of self-generated pairs, judged by the implicit DPO reward, after
Diffusion-DPO on the seed set ``data.path``; each round trains with the pairwise trainer and its loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffalign.config_fields import Checker, setting
from diffalign.methods import Method, register_method
from diffalign.methods.offline import paired_reference_losses


@dataclass
class SAILConfig:
    """train.method sail (SAIL, arXiv 2602.05380): rounds of self-generated pairs after Diffusion-DPO on
    the seed set data.path. Paper values: 3 rounds (SD 1.5), 8 samples per prompt, alpha 0.25, 10 reward draws,
    50-step sampling at CFG 7.5 (SD 1.5)."""

    # self-amplification rounds after round 0 (DPO on the seed pairs)
    rounds: int = setting(3, ge=0, note="0 = Diffusion-DPO on the seed set only")
    prompts: str = ""  # .txt or dataset of prompts for the rounds (taken in order, fresh per round while they last)
    prompts_per_round: int = setting(64, ge=1)
    # N candidates per prompt; best vs worst becomes one pair
    samples_per_prompt: int = setting(8, ge=2, note="best against worst")
    # alpha: share of self-generated pairs in a round's training mixture
    self_fraction: float = setting(0.25, ge=0, lt=1, note="the paper: 0.25")
    # (t, eps) draws of the implicit DPO reward, shared by a prompt's candidates
    reward_draws: int = setting(10, ge=1, note="the paper: 10")
    judge_policy: Literal["current", "anchor"] = "current"  # current | anchor (the round-0 model)
    # previous (the model the policy was trained from) | base (model.pretrained)
    judge_reference: Literal["previous", "base"] = "previous"
    sampler: Literal["ddim", "ode"] = "ddim"  # ddim (SD/SDXL; noise_level = eta) | ode (SD3)
    sample_steps: int = setting(50, ge=1)
    guidance_scale: float = 7.5
    noise_level: float = 1.0
    sample_batch_size: int = setting(16, ge=1)
    steps_per_round: int | None = setting(None, ge=1)  # optimizer steps of rounds >= 1 (null = train.max_steps)


def _validate(c: Checker) -> None:
    s = c.config.sail
    c.check("sail.prompts", bool(s.prompts) or s.rounds == 0, "a prompt file or dataset for the rounds")


_SAIL = "diffalign.trainers.sail:run_sail"  # the rounds; each round trains with the pairwise trainer
register_method(
    Method(
        "sail",
        "diffusion",
        _SAIL,
        sections={"sail": (SAILConfig,)},
        default_loss="dpo",
        losses=paired_reference_losses,
        validate=_validate,
    )
)
