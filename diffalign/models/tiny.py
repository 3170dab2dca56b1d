"""Tiny, randomly initialised Stable-Diffusion-style components built from configs (no downloads).

Used by tests, benchmarks and the toy world. The sizes follow diffusers' own pipeline tests (a two-level UNet with
cross-attention at the lower level, a two-level VAE that downsamples by 2 — four levels give SD's 8 — and a 5-layer
CLIP text encoder of width 32) while the tokenizer is the real CLIP BPE tokenizer (vocabulary 49408), so token ids
equal those of SD's tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffalign.models.clip_tokenizer import build_clip_tokenizer

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def tiny_sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """SD 1.x/2.x training noise schedule: 1000 steps, scaled-linear betas 0.00085 -> 0.012, no sample clipping."""
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def tiny_vae(
    sample_size: int,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    **config: Any,
) -> AutoencoderKL:
    """A tiny ``AutoencoderKL`` with 4 latent channels, ``len(block_out_channels)`` levels (downsampling by
    2^(levels − 1)); ``config`` adds e.g. SD3's ``shift_factor`` / ``scaling_factor``. Uses the global RNG."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        **config,
    )


def tiny_sd_components(
    *,
    prediction_type: str = "epsilon",
    with_vae: bool = True,
    sample_size: int = 16,
    seed: int = 0,
    cross_attention_dim: int = 32,
    tokenizer_max_length: int = 77,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 2,
    vae_block_out_channels: tuple[int, ...] = (32, 64),
    vae_layers_per_block: int = 1,
) -> dict[str, Any]:
    """Build ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}`` for a tiny SD model.

    ``sample_size`` is the image side in pixels. With a VAE (4 latent channels; ``len(vae_block_out_channels)``
    levels, so a downsampling factor of 2 for the default two levels and 8, SD's, for four) the UNet works on
    ``sample_size // factor`` latents; without one (``vae`` is ``None``) the UNet works directly on 3-channel pixels.
    Weights depend only on ``seed`` (the global RNG state is left untouched).
    """
    factor = 2 ** (len(vae_block_out_channels) - 1) if with_vae else 1
    if sample_size % factor or sample_size // factor < 2:
        raise ValueError(f"sample_size {sample_size} must be a multiple of the VAE's downsampling factor {factor}")
    tokenizer = build_clip_tokenizer(model_max_length=tokenizer_max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = None
        if with_vae:
            vae = tiny_vae(sample_size, vae_block_out_channels, vae_layers_per_block)
        channels = 4 if with_vae else 3
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=sample_size // factor,
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=min(32, block_out_channels[0]),
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=37,
                num_hidden_layers=5,
                num_attention_heads=4,
                max_position_embeddings=tokenizer_max_length,
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (unet, vae, text_encoder):
        if module is not None:
            module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": tiny_sd_scheduler(prediction_type),
    }


def save_sd_components(path: str | os.PathLike, components: dict[str, Any]) -> Path:
    """Write ``components`` as a diffusers-layout folder (safetensors) and return its path.

    With a VAE this is a real ``StableDiffusionPipeline.save_pretrained`` folder (loadable with
    ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None)``). Without one (pixel space) each component is
    saved in its subfolder and ``model_index.json`` records ``"vae": [null, null]``: the layout is the same, but
    ``StableDiffusionPipeline`` cannot sample from it (it always decodes with a VAE).
    """
    path = Path(path)
    if components.get("vae") is not None:
        pipeline = StableDiffusionPipeline(
            vae=components["vae"],
            text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"],
            unet=components["unet"],
            scheduler=components["scheduler"],
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(path, safe_serialization=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    components["unet"].save_pretrained(path / "unet", safe_serialization=True)
    components["text_encoder"].save_pretrained(path / "text_encoder", safe_serialization=True)
    components["tokenizer"].save_pretrained(path / "tokenizer")
    components["scheduler"].save_pretrained(path / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(components["scheduler"]).__name__],
        "text_encoder": ["transformers", type(components["text_encoder"]).__name__],
        "tokenizer": ["transformers", type(components["tokenizer"]).__name__],
        "unet": ["diffusers", type(components["unet"]).__name__],
        "vae": [None, None],
    }
    (path / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return path


def save_tiny_sd_pipeline(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Build ``tiny_sd_components(**kwargs)`` and save it with :func:`save_sd_components`; returns the folder."""
    return save_sd_components(path, tiny_sd_components(**kwargs))
