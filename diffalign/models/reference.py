"""peft LoRA layers of a model and the switch that disables them: the "same network with its adapters disabled"
reference of :class:`diffalign.trainers.reference.AdaptersDisabled`, for diffusion denoisers and causal LMs alike."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.nn.parallel import DataParallel, DistributedDataParallel


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / DataParallel / DeepSpeed / ``torch.compile`` wrappers.

    A walk down the wrappers' attributes only: accelerate's ``extract_model_from_parallel`` also walks every
    submodule (looking for compiled regions) and probes for deepspeed on each call, ~1 ms a call on a tiny UNet,
    which the adapters pay several times a step (measured by scripts/bench_offline.py's profile)."""
    while True:
        if isinstance(model, DistributedDataParallel | DataParallel) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def lora_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """Every peft tuner layer of the unwrapped ``model``."""
    return [m for m in unwrap(model).modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


@contextmanager
def adapters_disabled(model: torch.nn.Module, layers: Sequence[BaseTunerLayer] | None = None) -> Iterator[None]:
    """Within the block every enabled peft adapter layer of ``model`` is disabled; re-enabled on exit.

    ``requires_grad`` of the adapter weights is never touched: peft's LoRA forward reads only the layer's disable
    flag, while its ``enable_adapters(False/True)`` would also flip ``requires_grad`` on every adapter weight and
    re-run ``set_adapter`` (about 13 ms a step on a tiny UNet, a fifth of a cached step). ``layers``: the model's
    :func:`lora_layers`, found once by a caller that toggles every step (the walk costs ~2 ms on a tiny UNet).
    """
    layers = lora_layers(model) if layers is None else layers
    if not layers:
        raise RuntimeError("the model has no peft adapters to disable")
    if any(layer.merged for layer in layers):
        raise RuntimeError("LoRA weights are merged into the base weights; unmerge them before disabling the adapters")
    was_enabled = [layer for layer in layers if not layer.disable_adapters]
    for layer in was_enabled:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in was_enabled:
            layer._disable_adapters = False
