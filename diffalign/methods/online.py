"""Online diffusion RL: ``grpo`` (Flow-GRPO, GRPO-Guard, DanceGRPO's sampler; arXiv 2505.05470) and
``direct_reward`` (reward back-propagation, D²-Align's two stages; arXiv 2512.24146), and the ``online`` section's
fields they read. Each method reads the settings classes it names; the rewards and group fields come from
:mod:`diffalign.methods.rl_settings`, shared with causal-LM GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from diffalign.config_fields import Checker, setting
from diffalign.methods import Method, register_method
from diffalign.methods.rl_settings import (
    GroupSettings,
    RewardSettings,
    no_loss_keys,
    no_precomputed_reference,
)

_GRPO = "diffalign.trainers.diffusion_grpo:DiffusionGRPOTrainer"  # Flow-GRPO / GRPO-Guard / DanceGRPO group RL
_DIRECT = "diffalign.trainers.direct_reward:direct_reward_trainer"  # reward back-propagation, D²-Align's two stages


@dataclass
class DiffusionRewardSettings(RewardSettings):
    """Rewarding a diffusion model's samples (train.method grpo / direct_reward on sd, sdxl, sd3)."""

    reward_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments per reward name
    sample_steps: int = setting(10, ge=1)
    guidance_scale: float = setting(4.5, ge=0, note="1 = no guidance")  # CFG in rollouts and the training forward
    # D2-Align reward correction (arXiv 2512.24146): ''="none" or a b_v file (correction.safetensors)
    reward_correction: str | None = None
    correction_omega: float = setting(1.5, gt=0, note="the paper uses 1.5")


@dataclass
class DiffusionSamplingSettings(DiffusionRewardSettings):
    """Rollout groups of online RL on a diffusion model (train.method grpo, nft): who samples how many images, how."""

    num_generations: int = 8  # images per prompt (a group)
    # sde (Flow-GRPO) | cps | dance (DanceGRPO) | ode | ddim (SD/SDXL, noise_level = eta); nft takes any, grpo a
    # stochastic one. nft's default is ode (DiffusionNFT's deterministic sampler)
    sampler: str = setting("sde", choices="diffalign.models.sampling:SAMPLER_KINDS")
    noise_level: float = setting(0.7, ge=0)  # Flow-GRPO's a; DanceGRPO's / DDIM's eta
    # flow models' sampling sigmas: null = the sampler's own (dance: DanceGRPO's shift(linspace(1, 0, S+1)); the
    # others: the pipeline's) | "pipeline" | "dance"
    sigma_schedule: str | None = setting(None, choices="diffalign.models.sampling:SIGMA_SCHEDULES")
    prompts_per_rollout: int = setting(8, ge=1)  # groups per rollout epoch, over all processes
    # rollout forward batch; null = train.train_batch_size (ratio 1 needs equal)
    sample_batch_size: int | None = setting(None, ge=1)
    same_initial_noise: bool = False  # a group shares its initial noise (flow_grpo same_latent)
    # trained steps = int(sample_steps * fraction): Flow-GRPO the first ones, DiffusionNFT a random subset per image
    timestep_fraction: float = setting(0.99, gt=0, le=1)
    inner_epochs: int = setting(1, ge=1)  # passes over each rollout
    # advantages are clipped to [-c, c] (DiffusionNFT: r = A / 2c + 1/2, and c scales its policy loss)
    adv_clip_max: float = setting(5.0, gt=0)


@dataclass
class RewardBalanceSettings:
    """Several rewards in group RL (train.method grpo, nft): their weighted sum, or MARBLE's gradient-space balance
    (arXiv 2605.06507)."""

    # weighted_sum: one reward sum_k w_k R_k, one advantage | marble: one advantage per reward, the per-reward
    # policy gradients combined by the min-norm quadratic program (needs >= 2 reward_functions, no reward_weights)
    reward_balance: Literal["weighted_sum", "marble"] = "weighted_sum"
    # nft: solve MARBLE's QP every this many optimizer steps (K + 1 backward passes), reuse the smoothed
    # coefficients in between (one backward on the blended advantage); grpo solves it at every step
    marble_every: int = setting(10, ge=1, note="MARBLE's amortisation period")
    marble_rho: float = setting(0.7, ge=0, lt=1, note="EMA decay of the balancing coefficients; 0 = no smoothing")
    marble_floor: float = setting(0.0, ge=0, lt=1, note="lower bound on each coefficient; K * floor <= 1")
    # weighted_sum: also log each reward's gradient cosine with the update every this many optimizer steps (K + 1
    # extra backward passes on that step's first micro-batch); 0 = never. marble logs them whenever it solves
    reward_gradient_log_every: int = setting(0, ge=0)


@dataclass
class DiffusionRolloutSettings(GroupSettings, DiffusionSamplingSettings):
    """train.method grpo on a diffusion model: stochastic rollouts and the clipped policy loss."""

    sde_window_size: int = 0  # Flow-GRPO-Fast: SDE only on this many consecutive steps (0 = all steps)
    sde_window_range: list[int] | None = None  # [lo, hi): where the window may start (null = [0, sample_steps // 2])
    # PPO clip on the mean-over-latent log-prob ratio (flow_grpo's clip_range; causal-LM GRPO uses TRL's epsilon)
    clip_range: float = setting(1e-4, gt=0, note="Flow-GRPO 1e-4, GRPO-Guard 2e-6..4e-6")
    # flow_grpo (PPO clip) | grpo_guard (RatioNorm + 1/|dt| reweighting) | a registered policy loss
    policy_loss: str = setting("flow_grpo", choices="diffalign.losses.policy_registry:POLICY_LOSSES")
    drop_zero_advantage: bool = True  # drop samples whose advantage is 0 (re-added to keep micro-batch counts)


@dataclass
class DirectRewardSettings(DiffusionRewardSettings):
    """train.method direct_reward (SRPO / Direct-Align style reward back-propagation; D²-Align stages 1 and 2)."""

    direct_stage: Literal["generator", "correction"] = "generator"  # generator (train the denoiser) | correction
    direct_sigma_range: list[float] = field(default_factory=lambda: [0.1, 0.9])  # sigma ~ U[lo, hi] of the added noise


def check_rewards(c: Checker) -> None:
    o = c.config.online
    no_loss_keys(c)
    c.check("online.reward_functions", bool(o.reward_functions), "at least one reward model name")
    if o.reward_weights is not None and len(o.reward_weights) != len(o.reward_functions):
        c.fail("online.reward_weights", f"{len(o.reward_weights)} weights for {len(o.reward_functions)} rewards")
    unknown = set(o.reward_options) - set(o.reward_functions)
    if unknown:
        c.fail("online.reward_options", f"options for {sorted(unknown)}, which are not in online.reward_functions")


def _validate_direct(c: Checker) -> None:
    o = c.config.online
    check_rewards(c)
    lo, hi = (o.direct_sigma_range + [None, None])[:2] if len(o.direct_sigma_range) == 2 else (None, None)
    c.check("online.direct_sigma_range", lo is not None and 0 < lo <= hi < 1, "[lo, hi] with 0 < lo <= hi < 1")
    if c.config.online.direct_stage == "correction" and c.config.online.reward_correction:
        c.fail("online.reward_correction", "stage 'correction' learns b_v; leave online.reward_correction empty")


def check_reward_balance(c: Checker) -> None:
    """MARBLE balances two or more rewards by itself: no hand-set weights."""
    o = c.config.online
    if o.reward_balance != "marble":
        return
    c.check("online.reward_functions", len(o.reward_functions) >= 2, "two or more rewards for reward_balance marble")
    if o.reward_weights is not None:
        c.fail("online.reward_weights", "reward_balance marble sets the balance itself; remove online.reward_weights")
    c.check("online.marble_floor", o.marble_floor * len(o.reward_functions) <= 1, "<= 1 / number of rewards")
    if o.reward_correction:
        c.fail("online.reward_correction", "applies to one reward, not to reward_balance marble")


def check_groups(c: Checker) -> None:
    """Group RL compares the images of one prompt, and its reference sees fresh rollouts."""
    o = c.config.online
    check_rewards(c)
    check_reward_balance(c)
    c.check("online.num_generations", o.num_generations >= 2, ">= 2 (advantages compare images of a prompt)")
    no_precomputed_reference(c)


def _validate_grpo(c: Checker) -> None:
    o = c.config.online
    check_groups(c)
    c.check("online.sde_window_size", 0 <= o.sde_window_size <= o.sample_steps, "in [0, sample_steps]")
    if o.sde_window_range is not None:
        ok = len(o.sde_window_range) == 2 and 0 <= o.sde_window_range[0] < o.sde_window_range[1] <= o.sample_steps
        c.check("online.sde_window_range", ok, "[lo, hi) with 0 <= lo < hi <= sample_steps")
    c.check(
        "online.timestep_fraction",
        int(o.sample_steps * o.timestep_fraction) >= 1 or o.sde_window_size > 0,
        f"large enough to train at least one of the {o.sample_steps} steps",
    )
    if o.policy_loss == "grpo_guard" and o.sampler in ("cps", "ode"):
        c.fail("online.policy_loss", f"grpo_guard needs a Gaussian step (sde, dance or ddim), not '{o.sampler}'")
    if o.sampler == "ode":
        c.fail("online.sampler", "rollouts need a stochastic sampler (sde, cps, dance or ddim); 'ode' has no ratio")


register_method(
    Method(
        "grpo",
        "diffusion",
        _GRPO,
        sections={"online": (DiffusionRolloutSettings, RewardBalanceSettings)},
        validate=_validate_grpo,
    )
)
register_method(
    Method(
        "direct_reward", "diffusion", _DIRECT, sections={"online": (DirectRewardSettings,)}, validate=_validate_direct
    )
)
