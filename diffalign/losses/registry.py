"""Name → loss function registry (``LOSSES``), filled by the :func:`register` decorator."""

from __future__ import annotations

import difflib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

import torch

from diffalign.errors import DiffalignError
from diffalign.losses.types import LossOutput

LossKind = Literal["paired", "unpaired", "chosen_only", "listwise"]
_KINDS: tuple[str, ...] = ("paired", "unpaired", "chosen_only", "listwise")

LossFn = Callable[..., LossOutput]
F = TypeVar("F", bound=LossFn)

LOSSES: dict[str, LossFn] = {}


class UnknownLossError(DiffalignError, KeyError, ValueError):
    """Raised by :func:`get_loss` for a name that is not registered (catchable as ``KeyError`` or ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


def register(name: str, *, needs_reference: bool, kind: LossKind) -> Callable[[F], F]:
    """Register a loss under ``name`` and tag it with ``loss_name``, ``needs_reference`` and ``kind``.

    ``kind`` tells a trainer which inputs to build: ``"paired"`` (chosen and rejected log-likelihoods per pair),
    ``"unpaired"`` (one log-likelihood and a binary label per sample), ``"chosen_only"`` (chosen side only) or
    ``"listwise"`` (``(B, n)`` ranked lists, or one chosen and ``(B, K)`` negatives).
    ``needs_reference`` says whether the trainer must supply reference-model log-likelihoods.
    """
    if kind not in _KINDS:
        raise ValueError(f"register({name!r}): kind must be one of {_KINDS}, got {kind!r}.")

    def decorator(fn: F) -> F:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__module__} and {fn.__module__}).")
        fn.loss_name = name  # type: ignore[attr-defined]
        fn.needs_reference = needs_reference  # type: ignore[attr-defined]
        fn.kind = kind  # type: ignore[attr-defined]
        LOSSES[name] = fn
        return fn

    return decorator


def unknown_loss(what: str, name: str, registered: Iterable[str], config_key: str) -> UnknownLossError:
    """The error for a ``what`` (``"loss"``, ``"policy loss"``) name that is not registered: the config key to check,
    the closest registered name and all of them."""
    valid = sorted(registered)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.0)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownLossError(
        f"unknown {what} {name!r} (check {config_key} in your config).{hint} Valid names: {', '.join(valid)}."
    )


def _resolved(annotation: object, fn: LossFn) -> object:
    """An annotation as an object: a string one (``from __future__ import annotations``, or a wrapper's
    ``__signature__``) is evaluated in the namespace of the function's module, as ``typing.get_type_hints`` does."""
    if not isinstance(annotation, str):
        return annotation
    namespace = {"torch": torch, "Tensor": torch.Tensor, **vars(sys.modules[fn.__module__])}
    try:
        return eval(annotation, namespace)  # noqa: S307 - an annotation of registered code, as typing evaluates it
    except Exception:  # noqa: BLE001 - a name only imported for type checking: not a tensor
        return None


def tensor_inputs(fn: LossFn) -> dict[str, bool]:
    """The tensor arguments of a loss function (annotated ``Tensor`` or ``Tensor | None``) -> whether each is
    required; its other keyword arguments (but ``**kwargs``) are hyper-parameters."""
    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        tp = _resolved(param.annotation, fn)
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if torch.Tensor in args and all(a in (torch.Tensor, type(None)) for a in args):
            out[name] = param.default is inspect.Parameter.empty
    return out


def get_loss(name: str) -> LossFn:
    """Return the loss registered as ``name``; unknown names raise :class:`UnknownLossError` naming the closest."""
    try:
        return LOSSES[name]
    except KeyError:
        raise unknown_loss("loss", name, LOSSES, "loss.name") from None
