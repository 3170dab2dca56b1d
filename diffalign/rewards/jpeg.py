"""JPEG compressibility (DDPO, Flow-GRPO): minus the JPEG file size of each image.

``x_uint8 = (x · 255).round().clamp(0, 255)`` (HWC), encoded by PIL as JPEG with ``quality=95``; ``size`` = bytes / 1000
(kB). Reward ``= -size / scale``: ``scale=500`` is flow_grpo's ``jpeg_compressibility`` (default), ``scale=1`` is
DDPO's ``jpeg_compressibility`` (``-size`` in kB) [CODE kvablack/ddpo-pytorch ``rewards.py``, flow_grpo
``rewards.py``]. Not differentiable; prompts are ignored (checked for count only).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from diffalign.rewards.base import check_images
from diffalign.utils.images import to_uint8


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """Size in kB (bytes / 1000) of one ``(H, W, 3)`` uint8 image saved by PIL as JPEG at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JPEGCompressibility:
    """``-jpeg_size_kb(image) / scale``; ``differentiable = False``."""

    name = "jpeg_compressibility"
    differentiable = False

    def __init__(self, scale: float = 500.0, quality: int = 95) -> None:
        if scale <= 0:
            raise ValueError(f"JPEGCompressibility scale must be positive, got {scale}")
        self.scale = float(scale)
        self.quality = int(quality)

    def to(self, device: str | torch.device) -> JPEGCompressibility:
        """No weights: returns ``self`` (the reward follows the images' device)."""
        return self

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        sizes = [jpeg_size_kb(image, self.quality) for image in to_uint8(images)]
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device) / self.scale
