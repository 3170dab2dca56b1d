"""Name → diffusion policy loss registry (``POLICY_LOSSES``, config key ``online.policy_loss``), filled by
:func:`register_policy_loss`.

A registered loss trains one sampler step of a rollout micro-batch: it takes a :class:`PolicyStep` and the clip
settings by keyword and returns a :class:`~diffalign.losses.policy.PolicyLossOutput`. The built-in ones
(``flow_grpo``, ``grpo_guard``) live in :mod:`diffalign.losses.policy`; importing :mod:`diffalign.losses` registers
them; the config takes the valid ``online.policy_loss`` values from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from diffalign.losses.registry import unknown_loss

if TYPE_CHECKING:
    import torch

PolicyLossFn = Callable[..., Any]  # (PolicyStep, *, clip_range, adv_clip_max) -> PolicyLossOutput
F = TypeVar("F", bound=PolicyLossFn)

POLICY_LOSSES: dict[str, PolicyLossFn] = {}


@dataclass
class PolicyStep:
    """One trained sampler step of a micro-batch, ``(B,)`` per sample unless noted.

    Attributes:
        logps: current policy's Gaussian log-probs of the stored transition (mean over latent elements).
        old_logps: the same stored at sampling time.
        advantages: per-sample advantages.
        means: current predicted next-sample means ``(B, ...)``.
        old_means: means stored at sampling time ``(B, ...)``; ``None`` unless the loss ``needs_means``.
        std_dev_t: σ_t of the step (a number or ``(B,)``).
        sqrt_dt: √(−Δ) of the step (a number or ``(B,)``).
    """

    logps: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    means: torch.Tensor
    old_means: torch.Tensor | None
    std_dev_t: torch.Tensor | float
    sqrt_dt: torch.Tensor | float


def register_policy_loss(name: str, *, needs_means: bool = False) -> Callable[[F], F]:
    """Register a diffusion policy loss under ``name`` and tag it with ``loss_name`` and ``needs_means``.

    ``needs_means`` says whether rollouts must store the transition means (:attr:`PolicyStep.old_means`).
    """

    def decorator(fn: F) -> F:
        if name in POLICY_LOSSES:
            raise ValueError(
                f"policy loss {name!r} is registered twice ({POLICY_LOSSES[name].__module__} and {fn.__module__})."
            )
        fn.loss_name = name  # type: ignore[attr-defined]
        fn.needs_means = needs_means  # type: ignore[attr-defined]
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered as ``name``; unknown names raise :class:`UnknownLossError` naming the closest."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise unknown_loss("policy loss", name, POLICY_LOSSES, "online.policy_loss") from None


__all__ = ["POLICY_LOSSES", "PolicyStep", "get_policy_loss", "register_policy_loss"]
