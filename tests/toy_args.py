"""Command-line arguments of a tiny toy Diffusion-DPO run of ``scripts/train.py`` (the launcher tests share them)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def toy_dpo_args(pipeline: str, data: str, out: Path, *extra: str) -> list[str]:
    """``configs/toy/dpo.yaml`` on ``pipeline`` and ``data`` at 16 px, batch 2, a checkpoint every 2 steps into
    ``out``; ``extra`` overrides come last."""
    return [
        "--config",
        str(REPO / "configs" / "toy" / "dpo.yaml"),
        f"model.pretrained={pipeline}",
        f"data.path={data}",
        "data.cache_dir=null",
        "data.resolution=16",
        "optim.lr=0.05",
        "optim.adam_epsilon=1.0",
        "train.train_batch_size=2",
        "train.checkpointing_steps=2",
        "train.checkpoints_total_limit=null",
        "train.progress_bar=false",
        f"train.output_dir={out}",
        *extra,
    ]
