"""``nft`` (DiffusionNFT, arXiv 2509.16117): online RL on the forward process — rollouts with any sampler, rewards
turned into optimality probabilities, and the negative-aware flow-matching loss on the clean samples
(:func:`diffalign.losses.nft.nft_loss`). The ``nft`` section holds the method's own knobs, with the defaults of the
authors' ``config/nft.py`` (NVlabs/DiffusionNFT); the rollouts read the ``online`` keys that Flow-GRPO reads, with
DiffusionNFT's defaults where they differ (the ODE sampler, no CFG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffalign.config_fields import Checker, setting
from diffalign.methods import Method, register_method
from diffalign.methods.online import DiffusionSamplingSettings, RewardBalanceSettings, check_groups


@dataclass
class NFTConfig:
    """train.method nft (DiffusionNFT, arXiv 2509.16117); defaults = NVlabs/DiffusionNFT ``config/nft.py``."""

    # the mixing coefficient of the implicit policies v+ = b v_theta + (1 - b) v_old (config.beta)
    beta: float = setting(1.0, gt=0, note="0.1 in the authors' OCR and multi-reward configs")
    # weight of mean((v_theta - v_ref)^2) to the frozen base (train.beta there); 0 = no reference forward
    kl_beta: float = setting(1e-4, ge=0)
    adaptive_weighting: bool = True  # divide each branch's x0 error by its detached mean |x0 error| (the code's)
    # old (sampling) policy <- d old + (1 - d) policy after every rollout epoch; d = min(rate * step, cap) after
    # `flat` steps: 0 = (0, 0, 0) always on-policy, 1 = (0, 0.001, 0.5) the default, 2 = (75, 0.0075, 0.999) (OCR)
    old_policy_decay: int = setting(1, ge=0, le=2, note="a schedule of losses.nft.OLD_POLICY_DECAY_SCHEDULES")
    # how the clipped advantage enters r: all | positive_only | negative_only | one_only | binary
    adv_mode: Literal["all", "positive_only", "negative_only", "one_only", "binary"] = "all"
    global_std: bool = True  # advantages: per-prompt mean, std over the whole rollout epoch (else per prompt)


def _validate_nft(c: Checker) -> None:
    check_groups(c)
    o = c.config.online
    c.check(
        "online.timestep_fraction",
        int(o.sample_steps * o.timestep_fraction) >= 1,
        f"large enough to train at least one of the {o.sample_steps} steps",
    )


register_method(
    Method(
        "nft",
        "diffusion",
        "diffalign.trainers.diffusion_nft:DiffusionNFTTrainer",
        sections={"online": (DiffusionSamplingSettings, RewardBalanceSettings), "nft": (NFTConfig,)},
        validate=_validate_nft,
        defaults={"online.sampler": "ode", "online.guidance_scale": 1.0},
    )
)
