"""The tiny offline training config several trainer tests start from (LoRA rank 4, lr 1e-3, batch 2, no progress
bar); each test file adds what it checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.config import Config


def tiny_lora_config(model: str, data: str, out: Path, *, resolution: int = 16, **train: Any) -> Config:
    """A config training a rank-4 LoRA (lr 1e-3) of the pipeline ``model`` on the pairs ``data`` at ``resolution``
    px into ``out``, batch 2 and no progress bar; ``train`` sets further ``train.*`` fields (e.g. ``max_steps``)."""
    cfg = Config()
    cfg.model.pretrained = model
    cfg.data.path = data
    cfg.data.resolution = resolution
    cfg.lora.rank = 4
    cfg.optim.lr = 1e-3
    for key, value in {"output_dir": str(out), "train_batch_size": 2, "progress_bar": False, **train}.items():
        setattr(cfg.train, key, value)
    return cfg
