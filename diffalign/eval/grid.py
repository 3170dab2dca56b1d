"""Labelled image grids for people to look at (before/after comparisons, samples per method)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffalign.utils.images import to_uint8


def labelled_grid(
    rows: Sequence[torch.Tensor],
    labels: Sequence[str],
    path: str | os.PathLike,
    *,
    scale: int = 4,
    label_width: int = 120,
    column_labels: Sequence[str] | None = None,
) -> Path:
    """Save a PNG with one row per ``[N, 3, H, W]`` tensor in [0, 1], upscaled ``scale``× (nearest), each row
    labelled on its left and, optionally, each column on top."""
    if len(rows) != len(labels):
        raise ValueError(f"labelled_grid: {len(rows)} rows but {len(labels)} labels")
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    top = 14 if column_labels else 0
    canvas = Image.new("RGB", (label_width + n * (w + 2), top + len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(column_labels or []):
        draw.text((label_width + c * (w + 2), 1), text[: max(1, w // 6)], fill="black")
    for r, (images, label) in enumerate(zip(rows, labels, strict=True)):
        y = top + r * (h + 2)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        arrays = to_uint8(images)
        for c, array in enumerate(arrays):
            tile = Image.fromarray(array).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (w + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
