"""What the online-RL trainer tests share (Flow-GRPO / GRPO-Guard / D²-Align, DiffusionNFT / MARBLE): tiny SD3 and SD
pipelines with a four-prompt file, a tiny-budget config of any online method, and the run's logged metrics."""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.config import Config, load_config
from diffalign.models.tiny import save_tiny_sd_pipeline
from diffalign.models.tiny_sd3 import save_tiny_sd3_pipeline

REWARDS_FILE = Path(__file__).with_name("online_rewards.py")
PROMPTS = ["a red circle", "a green square", "a blue triangle", "a red square"]


def save_online_models(root: Path) -> dict[str, Path]:
    """Tiny SD3 and SD pipelines (16 px, no VAE) and the prompt file under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {
        "sd3": save_tiny_sd3_pipeline(root / "sd3", sample_size=16, with_vae=False),
        "sd": save_tiny_sd_pipeline(root / "sd", sample_size=16, with_vae=False),
        "prompts": root / "prompts.txt",
    }


def online_config(
    dirs: dict[str, Path],
    out: Path,
    method: str,
    rewards: list[str],
    *extra: str,
    backbone: str = "sd3",
    sd_noise_level: float = 1.0,
) -> Config:
    """Two optimizer steps of ``method`` on the tiny ``backbone``: 2 prompts x 4 images per rollout, 3 sampler steps
    (2 trained), full fine-tuning at lr 1e-3; the SD backbone samples with DDIM at ``sd_noise_level``. ``extra``
    overrides come last."""
    overrides = [
        f"model.pretrained={dirs[backbone]}",
        f"model.backbone={backbone}",
        f"data.path={dirs['prompts']}",
        "data.resolution=16",
        "lora.enabled=false",
        "optim.lr=1e-3",
        f"train.method={method}",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.train_batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.checkpointing_steps=2",
        "train.progress_bar=false",
        f"online.reward_functions=[{','.join(rewards)}]",
        "online.sample_steps=3",
        "online.num_generations=4",
        "online.prompts_per_rollout=2",
        "online.timestep_fraction=0.67",
    ]
    if backbone == "sd":
        overrides += ["online.sampler=ddim", f"online.noise_level={sd_noise_level}"]
    path = out.parent / f"{out.name}_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    return load_config(path, overrides + list(extra))


def run_metrics(out: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
