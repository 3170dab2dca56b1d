"""The reference model, as one small object per ``train.reference`` mode, built once from the config.

Every objective with a reference (Diffusion-DPO and its variants, DCPO, SAIL's DPO rounds, the LLM preference
losses, the GRPO KL terms) asks one question: the reference's value of this batch. Where the value comes from is
decided once, by :func:`build_reference`, and nowhere else:

* :class:`AdaptersDisabled` (LoRA, ``auto``): the policy itself with its peft adapters switched off. The base weights
  never train, so this is the initial model at no memory cost (diffusers' ``train_diffusion_dpo.py``, TRL's PEFT path).
* :class:`FrozenCopy` (full fine-tune, ``auto`` / ``frozen_copy``): a frozen, eval-mode deep copy on the device.
* :class:`OffloadedCopy` (``frozen_copy_offload``): that copy kept in CPU memory and streamed to the device per
  forward (:func:`~diffalign.trainers.reference_store.offloaded_frozen_copy`).
* :class:`PrecomputedReference` (``precomputed``): no network while training. One pass before the first step computes
  the values from the initial weights; training looks them up by (epoch, sample index).

A trainer says HOW to evaluate a network on a batch, ``forward(module) -> T``, and :meth:`ReferenceModel.logps`
either runs it on the reference network under ``torch.no_grad()`` (live modes) or returns the stored ``T``. Because
the precompute pass evaluates the very same ``forward`` (:meth:`PrecomputedReference.compute`) on the very same
batches, stored values equal live ones bit for bit. Callers that need the network itself at a point no pass can
store (the diffusion GRPO KL at a sampler step of a fresh rollout) use :meth:`ReferenceModel.network`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from diffalign.config import REFERENCE_MODES
from diffalign.models.reference import adapters_disabled, lora_layers
from diffalign.trainers.reference_store import MissingReferenceError, OffloadedReference, offloaded_frozen_copy
from diffalign.utils.modules import move_module

T = TypeVar("T")
#: Evaluates a network on one batch; what it returns is what the objective consumes (and the store holds).
Forward = Callable[[torch.nn.Module], T]
#: Stored values of one batch: ``lookup(batch, epoch)``.
Lookup = Callable[[Mapping[str, Any], int], Any]


class ReferenceModel(ABC):
    """Where a trainer's reference values come from (see the module docstring).

    Attributes:
        mode: ``"adapters_disabled"``, ``"frozen_copy"``, ``"frozen_copy_offload"`` or ``"precomputed"``.
        live: whether a network runs during training (every mode but ``precomputed``).
    """

    mode: str
    live: bool

    @abstractmethod
    def logps(self, batch: Mapping[str, Any], epoch: int, forward: Forward[T]) -> T:
        """The reference's values of ``batch`` (drawn in ``epoch``): ``forward`` of the reference network without
        grad, or the stored result of that same ``forward``."""

    @abstractmethod
    def network(self) -> AbstractContextManager[torch.nn.Module]:
        """A context yielding the reference network itself (grad is the caller's business)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the start-up summary."""

    def shardable_module(self) -> torch.nn.Module | None:
        """A second network to shard with the policy under FSDP2 (the frozen copy), or ``None``."""
        return None


class LiveReference(ReferenceModel):
    """A reference that is a network during training: :meth:`logps` runs ``forward`` on :meth:`network`."""

    live = True

    def logps(self, batch: Mapping[str, Any], epoch: int, forward: Forward[T]) -> T:
        with self.network() as module, torch.no_grad():
            return forward(module)


class AdaptersDisabled(LiveReference):
    """LoRA: the policy with its peft adapters disabled, in the policy's own train / eval mode.

    ``policy`` is the bare module (not the DDP wrapper): a no-grad forward needs none of the wrapper's gradient
    bookkeeping, and it is the same parameters either way.
    """

    mode = "adapters_disabled"

    def __init__(self, policy: torch.nn.Module) -> None:
        self.policy = policy
        self._layers: list[BaseTunerLayer] | None = None  # found at the first use (the adapters exist by then)

    @contextmanager
    def network(self) -> Iterator[torch.nn.Module]:
        if self._layers is None:
            self._layers = lora_layers(self.policy)
        with adapters_disabled(self.policy, self._layers):
            yield self.policy

    def describe(self) -> str:
        return "the policy with its LoRA adapters disabled (no second network)"


class FrozenCopy(LiveReference):
    """Full fine-tuning: ``module``, a network that stays at the initial weights (made by :meth:`of`)."""

    mode = "frozen_copy"

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @classmethod
    def of(cls, policy: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> FrozenCopy:
        """A frozen, eval-mode deep copy of ``policy`` on ``device`` (in ``dtype``; ``None`` keeps the policy's)."""
        frozen = copy.deepcopy(policy).requires_grad_(False).eval()
        return cls(move_module(frozen, device, dtype))

    @contextmanager
    def network(self) -> Iterator[torch.nn.Module]:
        yield self.module

    def describe(self) -> str:
        return f"frozen copy on {next(self.module.parameters()).device}"

    def shardable_module(self) -> torch.nn.Module | None:
        return self.module


class OffloadedCopy(FrozenCopy):
    """Full fine-tuning: the frozen copy in CPU memory, streamed to the execution device per forward."""

    mode = "frozen_copy_offload"
    module: OffloadedReference

    @classmethod
    def of(cls, policy: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> OffloadedCopy:
        """The copy of a ``policy`` that is still on the CPU (so the copy never occupies ``device``)."""
        return cls(offloaded_frozen_copy(policy, device, dtype or next(policy.parameters()).dtype))

    def describe(self) -> str:
        return f"frozen copy in CPU memory, streamed to {self.module.anchor.device} per forward"

    def shardable_module(self) -> torch.nn.Module | None:
        return None  # it lives in CPU memory on every process; nothing to shard


class PrecomputedReference(ReferenceModel):
    """``precomputed``: stored values; no network while training.

    Until :meth:`load`, the object holds the network the values come from, ``source``: the policy itself, whose
    weights are the initial ones until the first step and until a checkpoint is restored (the trainer runs its pass
    in ``after_prepare``, before either), or with LoRA the policy with adapters disabled. :meth:`compute` evaluates a
    ``forward`` on it as a live frozen copy runs (eval mode, no grad). :meth:`load` attaches the stored values and
    lets the source go: from then on the policy trains, so a value found missing later is refused instead of being
    computed from weights that are no longer the reference.
    """

    mode = "precomputed"
    live = False

    def __init__(self, source: LiveReference) -> None:
        self._source: LiveReference | None = source
        self._lookup: Lookup | None = None
        self._where = "not loaded yet"

    def compute(self, forward: Forward[T]) -> T:
        """``forward`` on the initial reference network in eval mode without grad: a value for the store.

        Raises:
            MissingReferenceError: the stored values were loaded already, the policy is no longer the reference.
        """
        if self._source is None:
            raise MissingReferenceError(
                "train.reference=precomputed: reference values can only be computed before training starts, from the "
                "initial weights (this run's policy trains or was restored from a checkpoint); run once from the "
                "initial weights to fill the store, or use train.reference=frozen_copy"
            )
        with self._source.network() as module:
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    return forward(module)
            finally:
                module.train(was_training)

    def load(self, lookup: Lookup, where: str) -> None:
        """Serve :meth:`logps` from ``lookup(batch, epoch)`` (stored in ``where``); the source network is let go."""
        self._lookup, self._where, self._source = lookup, where, None

    def logps(self, batch: Mapping[str, Any], epoch: int, forward: Forward[T]) -> T:
        if self._lookup is None:
            raise RuntimeError(
                "train.reference=precomputed: no stored values are loaded; the trainer loads them in after_prepare"
            )
        return self._lookup(batch, epoch)

    def network(self) -> AbstractContextManager[torch.nn.Module]:
        raise RuntimeError(
            "train.reference=precomputed holds no reference network, only stored values of the data set's batches; "
            "use train.reference=auto (or frozen_copy_offload) where the reference runs on new inputs"
        )

    def describe(self) -> str:
        return f"precomputed ({self._where})"


def build_reference(
    mode: str,
    policy: torch.nn.Module,
    *,
    lora: bool,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    stored_values: bool = True,
) -> ReferenceModel:
    """The reference of ``train.reference`` = ``mode`` for the bare ``policy``.

    ``auto``: adapters disabled under LoRA, a frozen copy under full fine-tuning. Copies are made in ``dtype``
    (``None``: the policy's); call this while a fully fine-tuned policy is still on the CPU, so that an offloaded copy
    never occupies the device. ``stored_values=False``: the caller evaluates the reference on inputs no pass can
    store in advance (online rollouts), so ``precomputed`` is refused. That LoRA goes with neither copy is the
    config's rule (``diffalign.config``), not repeated here.
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"train.reference: {mode!r} is not one of {REFERENCE_MODES}")
    if mode == "precomputed":
        if not stored_values:
            raise ValueError(
                "train.reference: 'precomputed' stores values of a fixed data set, but this trainer evaluates the "
                "reference on fresh rollouts (online.beta > 0); use train.reference=auto"
            )
        # before its first step the policy holds the initial weights: it is the frozen copy the values come from
        return PrecomputedReference(AdaptersDisabled(policy) if lora else FrozenCopy(policy))
    if mode == "frozen_copy_offload":
        return OffloadedCopy.of(policy, device, dtype)
    if mode == "auto" and lora:
        return AdaptersDisabled(policy)
    return FrozenCopy.of(policy, device, dtype)
