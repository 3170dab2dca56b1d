"""Labelled image grids for people to look at (before/after comparisons, samples per method)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffalign.utils.images import to_uint8

LINE_HEIGHT = 12  # pixels per line of PIL's default font


def wrap_label(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide in ``draw``'s font; a single word wider
    than that is cut to fit (never silently dropped elsewhere)."""
    lines: list[str] = []
    for word in text.split() or [""]:
        while draw.textlength(word) > width and len(word) > 1:
            word = word[:-1]
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


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
    labelled on its left and, optionally, each column on top (wrapped onto as many lines as the longest needs)."""
    if len(rows) != len(labels):
        raise ValueError(f"labelled_grid: {len(rows)} rows but {len(labels)} labels")
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2] * scale, rows[0].shape[-1] * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    headers = [wrap_label(measure, text, w) for text in column_labels or []]
    top = LINE_HEIGHT * max(map(len, headers)) + 2 if headers else 0
    canvas = Image.new("RGB", (label_width + n * (w + 2), top + len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(headers):
        for i, line in enumerate(lines):
            draw.text((label_width + c * (w + 2), 1 + i * LINE_HEIGHT), line, fill="black")
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
