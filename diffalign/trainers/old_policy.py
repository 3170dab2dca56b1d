"""The old (sampling) policy of DiffusionNFT: a slow average of the trained parameters, swapped in for rollouts and
for the ``v_old`` forward.

The authors keep it as a second LoRA adapter (``scripts/train_nft_sd3.py``: ``add_adapter("old")``,
``set_adapter("old")`` while sampling); here it is one copy of the trained tensors (LoRA or full weights), swapped
into the parameters' storage inside :meth:`OldPolicy.active` (no autograd graph may be alive there: only ``no_grad``
forwards run inside), and updated once per rollout epoch with ``θ_old ← d·θ_old + (1 − d)·θ``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch


class OldPolicy:
    """A copy of ``params()`` (the trained parameters, in the trainer's order)."""

    def __init__(self, params: Callable[[], Sequence[torch.nn.Parameter]]) -> None:
        self.params = params
        self.values = [p.detach().clone() for p in params()]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``θ_old ← decay·θ_old + (1 − decay)·θ`` (``decay = 0`` copies the current policy)."""
        for value, param in zip(self.values, self.params(), strict=True):
            value.mul_(decay).add_(param.detach().to(value.dtype), alpha=1.0 - decay)

    @contextmanager
    def active(self) -> Iterator[None]:
        """The parameters hold the old policy's values inside the block (run ``no_grad`` forwards only)."""
        params = list(self.params())
        current = [p.data for p in params]
        try:
            for param, value in zip(params, self.values, strict=True):
                param.data = value
            yield
        finally:
            for param, data in zip(params, current, strict=True):
                param.data = data

    def state_dict(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{parameter name: old value}`` (``names`` in the trainer's parameter order), for a safetensors file."""
        return {name: value.contiguous() for name, value in zip(names, self.values, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor], names: Sequence[str], where: str) -> None:
        if set(state) != set(names):
            raise ValueError(
                f"{where}: the old policy's parameters do not match the model's trainable parameters "
                f"({len(set(state) - set(names))} unexpected, {len(set(names) - set(state))} missing)"
            )
        for value, name in zip(self.values, names, strict=True):
            value.copy_(state[name])
