"""Read folders written by :mod:`diffalign.eval.generation` (PNG files + ``metadata.jsonl``) and pair two of them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffalign.eval.errors import EvalFileNotFoundError, EvalInputError
from diffalign.eval.generation import METADATA, SETTINGS, read_metadata


@dataclass
class ImageFolder:
    """A generated folder's images in canonical order (prompt index, then sample index). ``images`` is float
    ``[N, 3, H, W]`` in [0, 1]; ``entries[i]`` is image ``i``'s metadata line."""

    path: Path
    entries: list[dict[str, Any]]
    images: torch.Tensor
    generation: dict[str, Any] | None = None

    @property
    def prompts(self) -> list[str]:
        return [e["prompt"] for e in self.entries]

    @property
    def files(self) -> list[str]:
        return [e["file"] for e in self.entries]

    @property
    def keys(self) -> list[tuple[int, int]]:
        return [(int(e["prompt_index"]), int(e["sample_index"])) for e in self.entries]

    @property
    def name(self) -> str:
        return self.path.name

    def groups(self) -> dict[int, list[int]]:
        """Row numbers of each prompt index (in order of first appearance)."""
        out: dict[int, list[int]] = {}
        for row, (p, _) in enumerate(self.keys):
            out.setdefault(p, []).append(row)
        return out


def load_image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_image_folder(path: str | os.PathLike) -> ImageFolder:
    """All images listed in ``path/metadata.jsonl``; errors name the folder, the line's file or the duplicate key."""
    folder = Path(path)
    if not folder.is_dir():
        raise EvalFileNotFoundError(f"image folder {folder} does not exist; give one written by scripts/generate.py")
    entries = read_metadata(folder)
    if not entries:
        raise EvalInputError(f"{folder / METADATA} lists no images")
    seen: dict[tuple[int, int], str] = {}
    for entry in entries:
        key = (int(entry["prompt_index"]), int(entry["sample_index"]))
        if key in seen:
            raise EvalInputError(
                f"{folder / METADATA}: prompt_index {key[0]}, sample_index {key[1]} listed twice "
                f"({seen[key]} and {entry['file']})"
            )
        seen[key] = entry["file"]
        if not (folder / entry["file"]).is_file():
            raise EvalFileNotFoundError(f"{folder / METADATA} lists {entry['file']}, which is missing from {folder}")
    entries.sort(key=lambda e: (int(e["prompt_index"]), int(e["sample_index"])))
    arrays = [load_image(folder / e["file"]) for e in entries]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = sorted(shapes)
        raise EvalInputError(f"{folder}: images of different sizes {sizes}; one folder must hold one resolution")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    settings = folder / SETTINGS
    generation = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else None
    return ImageFolder(folder, entries, images, generation)


def check_paired(a: ImageFolder, b: ImageFolder) -> list[str]:
    """Raise if ``a`` and ``b`` do not hold the same (prompt index, sample index) keys with the same prompts; return
    warnings (e.g. different seeds: the comparison is then unpaired noise, still a valid win rate estimate)."""
    keys_a, keys_b = set(a.keys), set(b.keys)
    if keys_a != keys_b:
        only_a, only_b = sorted(keys_a - keys_b), sorted(keys_b - keys_a)

        def show(keys: Sequence[tuple[int, int]]) -> str:
            return ", ".join(f"(prompt_index {p}, sample_index {s})" for p, s in keys[:3]) + (
                " ..." if len(keys) > 3 else ""
            )

        parts = [
            f"{len(only_a)} only in {a.path}: {show(only_a)}" if only_a else "",
            f"{len(only_b)} only in {b.path}: {show(only_b)}" if only_b else "",
        ]
        raise EvalInputError(
            "the two folders must hold the same prompts × samples (generate both with the same prompts and "
            f"--n-per-prompt); images {'; '.join(p for p in parts if p)}"
        )
    warnings = []
    for ea, eb in zip(a.entries, b.entries, strict=True):
        if ea["prompt"] != eb["prompt"]:
            raise EvalInputError(
                f"prompts differ at prompt_index {ea['prompt_index']}: {a.path / ea['file']} has {ea['prompt']!r}, "
                f"{b.path / eb['file']} has {eb['prompt']!r}; generate both folders from the same prompt list"
            )
        if ea.get("seed") != eb.get("seed") and not warnings:
            warnings.append(
                f"seeds differ ({a.path / ea['file']}: {ea.get('seed')}, {b.path / eb['file']}: {eb.get('seed')}): "
                "samples are not paired by initial noise"
            )
    return warnings
