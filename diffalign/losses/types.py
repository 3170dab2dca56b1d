"""The value every loss returns, and the input checks all losses share."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """Per-sample result of one loss call; reduction (mean over the batch, all-reduce) is the trainer's job.

    Attributes:
        losses: ``(B,)`` loss per pair (paired losses) or per sample (unpaired / chosen-only), differentiable
            w.r.t. the policy log-likelihoods.
        chosen_rewards: ``(B,)`` detached implicit reward of the chosen side (see each loss), or ``None``.
        rejected_rewards: ``(B,)`` detached implicit reward of the rejected side, or ``None``.
        logits: ``(B,)`` detached margin fed to the sigmoid / hinge / square; ``> 0`` means the model prefers the
            chosen side (or, for unpaired losses, agrees with the label). ``(logits > 0)`` is the implicit accuracy.
        metrics: per-sample extras, each ``(B,)`` and detached (e.g. MaPO's win / lose scores).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None
    logits: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def check_logps(loss_name: str, **tensors: torch.Tensor) -> None:
    """Raise a clear error unless every keyword is a floating 1-D tensor and all share one shape and device."""
    first_key: str | None = None
    first: torch.Tensor | None = None
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"losses.{loss_name}: `{key}` must be a torch.Tensor of shape (B,), got {type(value).__name__}."
            )
        if not value.is_floating_point():
            raise TypeError(
                f"losses.{loss_name}: `{key}` has dtype {value.dtype}; pass floating log-likelihoods "
                "(float32 recommended)."
            )
        if value.dim() != 1:
            raise ValueError(
                f"losses.{loss_name}: `{key}` has shape {tuple(value.shape)}; pass one value per sample, shape (B,) "
                "(reduce per-element errors / per-token log-probs to one number per sample first)."
            )
        if first is None:
            first_key, first = key, value
        elif value.shape != first.shape or value.device != first.device:
            raise ValueError(
                f"losses.{loss_name}: `{key}` has shape {tuple(value.shape)} on {value.device} but `{first_key}` has "
                f"shape {tuple(first.shape)} on {first.device}; all inputs must hold one value per sample of the "
                "same batch, on the same device."
            )


def check_shape(
    loss_name: str, dims: tuple[str, ...], *, min_last: int = 1, floating: bool = True, **tensors: torch.Tensor | None
) -> None:
    """Raise a clear error unless every non-None keyword is a tensor with the axes ``dims`` (e.g. ``("B", "T")``), a
    last axis of at least ``min_last``, a floating dtype (unless ``floating=False``), and all share one shape and
    device."""
    want = f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"
    if min_last > 1:
        want += f" with {dims[-1]} >= {min_last}"
    first_key: str | None = None
    first: torch.Tensor | None = None
    for key, value in tensors.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"losses.{loss_name}: `{key}` must be a torch.Tensor of shape {want}, got {type(value).__name__}."
            )
        if floating and not value.is_floating_point():
            raise TypeError(f"losses.{loss_name}: `{key}` has dtype {value.dtype}; pass floating values.")
        if value.dim() != len(dims) or value.shape[-1] < min_last:
            raise ValueError(f"losses.{loss_name}: `{key}` has shape {tuple(value.shape)}; pass shape {want}.")
        if first is None:
            first_key, first = key, value
        elif value.shape != first.shape or value.device != first.device:
            raise ValueError(
                f"losses.{loss_name}: `{key}` has shape {tuple(value.shape)} on {value.device} but `{first_key}` has "
                f"shape {tuple(first.shape)} on {first.device}."
            )


def check_positive(loss_name: str, **values: float) -> None:
    """Raise ``ValueError`` unless every keyword is a finite number > 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"losses.{loss_name}: `{key}` must be a finite number > 0, got {value!r}.")


def check_smoothing(loss_name: str, label_smoothing: float, *, upper: float, inclusive: bool) -> None:
    """Raise ``ValueError`` unless ``0 <= label_smoothing <= upper`` (``< upper`` when not ``inclusive``)."""
    ok = 0.0 <= label_smoothing <= upper if inclusive else 0.0 <= label_smoothing < upper
    if not ok:
        bracket = "]" if inclusive else ")"
        raise ValueError(
            f"losses.{loss_name}: `label_smoothing` must be in [0, {upper}{bracket}, got {label_smoothing!r}."
        )
