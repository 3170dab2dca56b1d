"""Prompt lists for online training and generation: a ``.txt`` file (one prompt per line; blank lines and lines
starting with ``#`` skipped) or any source :func:`diffalign.data.llm.load_text_rows` reads with a ``prompt`` column
(``.jsonl`` / ``.json`` / ``.parquet``, a folder of them, a ``datasets`` hub name)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffalign.data.llm import TextDataError, load_text_rows
from diffalign.data.pickapic import DataNotFoundError


def load_prompts(path: str, *, split: str = "train", max_samples: int | None = None) -> list[str]:
    source = Path(path)
    if source.suffix == ".txt":
        if not source.is_file():
            raise DataNotFoundError(f"{path}: prompt file not found (data.path); give a .txt with one prompt per line")
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
    else:
        rows = load_text_rows(path, "prompts", split=split)
        bad = [i for i, row in enumerate(rows) if not isinstance(row["prompt"], str)]
        if bad:
            raise TextDataError(f"{path}: row {bad[0]}: 'prompt' must be a string for image generation")
        prompts = [row["prompt"] for row in rows]
    if not prompts:
        raise TextDataError(f"{path}: no prompts found; give one prompt per line (.txt) or a 'prompt' column")
    return prompts[:max_samples] if max_samples else prompts


class PromptDataset:
    """Prompt rows as they are (a trainer tokenises or encodes them when it generates); items carry their index."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, **self.rows[i]}


def collate_prompts(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"index": torch.tensor([ex["index"] for ex in examples]), "rows": list(examples)}
