"""Image tensor conversions shared by rewards, data writers and reports."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 array from float ``(N, 3, H, W)`` images in [0, 1]: ``(x·255).round().clamp(0, 255)``."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
