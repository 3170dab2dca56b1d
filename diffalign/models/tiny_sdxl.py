"""A tiny, randomly initialised SDXL pipeline built from configs (no downloads), for tests and benchmarks.

Sizes follow diffusers' own SDXL pipeline tests (a two-level UNet with ``addition_embed_type="text_time"``, two
CLIP text encoders of width 32, the second with a projection) with the real CLIP BPE tokenizer for both tokenizers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffalign.models.clip_tokenizer import build_clip_tokenizer
from diffalign.models.tiny import tiny_sd_scheduler, tiny_vae

#: SDXL's added conditions: 6 time ids, each embedded with ``addition_time_embed_dim`` sinusoids, + the pooled text.
TIME_IDS = 6


def tiny_clip_config(tokenizer: Any, hidden_size: int, projection_dim: int) -> CLIPTextConfig:
    """A 2-layer CLIP text config over the real CLIP vocabulary, with SD's special-token ids."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_sdxl_components(
    *, prediction_type: str = "epsilon", sample_size: int = 32, seed: int = 0, tokenizer_max_length: int = 77
) -> dict[str, Any]:
    """``{"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}``.

    ``sample_size`` is the image side in pixels (the two-level VAE halves it). Weights depend only on ``seed``.
    """
    tokenizer = build_clip_tokenizer(model_max_length=tokenizer_max_length)
    tokenizer_2 = build_clip_tokenizer(model_max_length=tokenizer_max_length)
    hidden_1, hidden_2, addition_dim = 16, 32, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = tiny_vae(sample_size)
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=sample_size // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=hidden_1 + hidden_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_dim,
            projection_class_embeddings_input_dim=TIME_IDS * addition_dim + hidden_2,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(tiny_clip_config(tokenizer, hidden_1, hidden_1))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2, hidden_2, hidden_2))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": tiny_sd_scheduler(prediction_type),
    }


def save_tiny_sdxl_pipeline(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Build :func:`tiny_sdxl_components` and write it with ``StableDiffusionXLPipeline.save_pretrained``."""
    pipeline = StableDiffusionXLPipeline(**tiny_sdxl_components(**kwargs))
    pipeline.save_pretrained(path, safe_serialization=True)
    return Path(path)
