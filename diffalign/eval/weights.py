"""Load what a training run wrote back onto its base model: ``unet/`` (full fine-tune) or LoRA weights."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import UNet2DConditionModel

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def load_trained_unet(base: str | os.PathLike, run_dir: str | os.PathLike) -> UNet2DConditionModel:
    """The UNet of ``base`` with the result of the run in ``run_dir`` applied (LoRA merged in, or replaced)."""
    run_dir = Path(run_dir)
    if (run_dir / "unet" / "config.json").is_file():
        return UNet2DConditionModel.from_pretrained(run_dir / "unet")
    if (run_dir / LORA_WEIGHTS).is_file():
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        unet.load_lora_adapter(str(run_dir), weight_name=LORA_WEIGHTS, prefix="unet")
        unet.fuse_lora()
        return unet
    raise FileNotFoundError(
        f"{run_dir} holds neither unet/ (full fine-tune) nor {LORA_WEIGHTS} (LoRA): is it a finished training run?"
    )
