"""Moving networks between devices and dtypes without no-op casts."""

from __future__ import annotations

import torch


def move_module(
    module: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """``module.to(device)``, then ``module.to(dtype=dtype)`` only when a floating parameter is not yet in ``dtype``.

    diffusers' ``ModelMixin.to`` warns about "modules that should be kept in float32" on every call that names a
    dtype, even a no-op one with nothing to keep; skipping the no-op keeps float32 runs free of that warning while a
    real cast (bf16 on a GPU) still goes through diffusers.
    """
    if device is not None:
        module.to(device)
    if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module
