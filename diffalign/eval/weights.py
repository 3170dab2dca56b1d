"""Load what a training run wrote back onto its base model: ``unet/`` or ``transformer/`` (full fine-tune) or LoRA
weights (merged in)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from diffalign.models.loading import ModelNotFoundError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
DENOISER_CLASSES = {"unet": UNet2DConditionModel, "transformer": SD3Transformer2DModel}


def trained_weights_kind(run_dir: str | os.PathLike, subfolder: str = "unet") -> str | None:
    """``"full"`` (``run_dir/subfolder/`` written by a full fine-tune), ``"lora"`` (LoRA weights) or ``None`` (no
    finished run there)."""
    run_dir = Path(run_dir)
    if (run_dir / subfolder / "config.json").is_file():
        return "full"
    if (run_dir / LORA_WEIGHTS).is_file():
        return "lora"
    return None


def load_trained_denoiser(
    base: str | os.PathLike, run_dir: str | os.PathLike, subfolder: str = "unet"
) -> torch.nn.Module:
    """The denoiser (``subfolder`` ``"unet"`` or ``"transformer"``) of ``base`` with the result of the run in
    ``run_dir`` applied: the fine-tuned weights, or the base with the run's LoRA fused in."""
    if subfolder not in DENOISER_CLASSES:
        raise ValueError(f"subfolder={subfolder!r}: expected one of {sorted(DENOISER_CLASSES)}")
    cls = DENOISER_CLASSES[subfolder]
    run_dir = Path(run_dir)
    kind = trained_weights_kind(run_dir, subfolder)
    if kind == "full":
        return cls.from_pretrained(run_dir / subfolder)
    if kind == "lora":
        denoiser = cls.from_pretrained(base, subfolder=subfolder)
        denoiser.load_lora_adapter(str(run_dir), weight_name=LORA_WEIGHTS, prefix=subfolder)
        denoiser.fuse_lora()
        denoiser.unload_lora()  # keeps the fused weights, drops the LoRA layers: a plain model that saves plainly
        return denoiser
    raise ModelNotFoundError(
        f"{run_dir} holds neither {subfolder}/ (full fine-tune) nor {LORA_WEIGHTS} (LoRA); is it a finished run?"
    )


def load_trained_unet(base: str | os.PathLike, run_dir: str | os.PathLike) -> UNet2DConditionModel:
    """The UNet of ``base`` with the result of the run in ``run_dir`` applied (LoRA merged in, or replaced)."""
    return load_trained_denoiser(base, run_dir, "unet")
