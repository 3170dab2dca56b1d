"""A tiny, randomly initialised FLUX.1 pipeline built from configs (no downloads), for tests and benchmarks.

Sizes follow diffusers' FLUX pipeline tests: a ``FluxTransformer2DModel`` with one double- and one single-stream block
(``patch_size`` 1 on 2×2-packed latents, rotary axes 4 + 4 + 8 = the head width 16), CLIP-L and T5 stand-ins of width
32, and a one-level-downsampling VAE with FLUX's ``shift_factor`` / ``scaling_factor``. ``guidance_embeds`` makes it a
FLUX.1-dev stand-in (the default) or, without, a FLUX.1-schnell one; the scheduler configs are the released models'
(dev: dynamic shifting over 256..4096 image tokens, base shift 0.5, max shift 1.15; schnell: static shift 1.0). T5's
SentencePiece tokenizer cannot be downloaded here, so the tiny T5 reads the CLIP BPE tokenizer instead (ids and
padding work the same way for the pipeline).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from diffalign.models.clip_tokenizer import build_clip_tokenizer
from diffalign.models.tiny import tiny_vae
from diffalign.models.tiny_sdxl import tiny_clip_config

#: ``scheduler/scheduler_config.json`` of black-forest-labs/FLUX.1-dev and FLUX.1-schnell.
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
#: The released FLUX.1 VAE's latent normalisation (``vae/config.json``).
FLUX_VAE_FACTORS = {"shift_factor": 0.1159, "scaling_factor": 0.3611}


def tiny_flux_components(
    *, sample_size: int = 32, seed: int = 0, guidance_embeds: bool = True, max_sequence_length: int = 32
) -> dict[str, Any]:
    """``{"transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}`` of a tiny
    FLUX.1-dev (``guidance_embeds=True``) or -schnell stand-in; ``max_sequence_length`` is the T5 tokenizer's length."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer(model_max_length=max_sequence_length)
    width = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae(sample_size, use_quant_conv=False, use_post_quant_conv=False, **FLUX_VAE_FACTORS)
        torch.manual_seed(seed + 1)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * vae.config.latent_channels,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=width,
            pooled_projection_dim=width,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, width, width))
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=width,
                d_kv=8,
                d_ff=64,
                num_layers=1,
                num_heads=4,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
            )
        )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    scheduler = FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
    }


def save_tiny_flux_pipeline(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Build :func:`tiny_flux_components` and write them with ``FluxPipeline.save_pretrained``."""
    FluxPipeline(**tiny_flux_components(**kwargs)).save_pretrained(path, safe_serialization=True)
    return Path(path)
