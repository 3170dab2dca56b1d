"""Call a pairwise preference loss on the ``(chosen, rejected)`` log-likelihood pairs an adapter's forward returns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def pair_loss(
    loss: Callable[..., Any],
    policy: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    beta: float,
) -> Any:
    """``loss`` (from :func:`diffalign.losses.get_loss`) of the policy's and the reference's (chosen, rejected)
    log-likelihoods at ``beta``."""
    return loss(
        policy_chosen_logps=policy[0],
        policy_rejected_logps=policy[1],
        reference_chosen_logps=reference[0],
        reference_rejected_logps=reference[1],
        beta=beta,
    )
