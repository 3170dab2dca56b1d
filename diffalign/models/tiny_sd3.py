"""A tiny, randomly initialised SD3 pipeline built from configs (no downloads), for tests and benchmarks.

Sizes follow diffusers' SD3 pipeline tests: a one-layer ``SD3Transformer2DModel``, two CLIP text encoders with
projections (CLIP-L / CLIP-G stand-ins) and, optionally, a tiny ``T5EncoderModel``. SD3's T5 tokenizer needs a
SentencePiece model that cannot be downloaded here, so the tiny T5 reads the real CLIP BPE tokenizer instead (ids
and padding work the same way for the adapter). The scheduler is SD3's: ``FlowMatchEulerDiscreteScheduler`` with
shift 3.0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffalign.models.clip_tokenizer import build_clip_tokenizer
from diffalign.models.tiny import tiny_vae
from diffalign.models.tiny_sdxl import tiny_clip_config

SD3_SHIFT = 3.0
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def tiny_sd3_components(
    *,
    sample_size: int = 32,
    seed: int = 0,
    with_t5: bool = False,
    with_vae: bool = True,
    tokenizer_max_length: int = 77,
) -> dict[str, Any]:
    """``{"transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
    "tokenizer_2", "tokenizer_3"}``; ``vae`` is ``None`` for a pixel-space model, the T5 pair ``None`` without T5.

    The joint attention width is 64 = the two CLIPs' 32 + 32 (as in the real model, where 768 + 1280 are padded to
    T5's 4096); the pooled projection width is 32 + 32.
    """
    tokenizer = build_clip_tokenizer(model_max_length=tokenizer_max_length)
    tokenizer_2 = build_clip_tokenizer(model_max_length=tokenizer_max_length)
    clip_hidden, joint_dim = 32, 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = None
        if with_vae:
            vae = tiny_vae(
                sample_size,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.0609,  # diffusers' SD3 pipeline tests
                scaling_factor=1.5035,
            )
        channels = 4 if with_vae else 3
        torch.manual_seed(seed + 1)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size // (2 if with_vae else 1),
            patch_size=2,
            in_channels=channels,
            out_channels=channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=joint_dim,
            pooled_projection_dim=2 * clip_hidden,
            pos_embed_max_size=32,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tokenizer, clip_hidden, clip_hidden))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tokenizer_2, clip_hidden, clip_hidden))
        text_encoder_3 = tokenizer_3 = None
        if with_t5:
            torch.manual_seed(seed + 4)
            tokenizer_3 = build_clip_tokenizer(model_max_length=tokenizer_max_length)
            text_encoder_3 = T5EncoderModel(
                T5Config(
                    vocab_size=len(tokenizer_3),
                    d_model=joint_dim,
                    d_kv=8,
                    d_ff=64,
                    num_layers=1,
                    num_heads=4,
                    pad_token_id=tokenizer_3.pad_token_id,
                    eos_token_id=tokenizer_3.eos_token_id,
                )
            )
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        if module is not None:
            module.eval()
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT),
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
    }


def save_tiny_sd3_pipeline(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Build :func:`tiny_sd3_components` and write it with ``StableDiffusion3Pipeline.save_pretrained`` (absent
    components are recorded as ``[null, null]`` in ``model_index.json``)."""
    components = tiny_sd3_components(**kwargs)
    if components["vae"] is None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, module in components.items():
            if module is not None:
                module.save_pretrained(path / name)
        _write_model_index(path, components)
        return path
    StableDiffusion3Pipeline(**components).save_pretrained(path, safe_serialization=True)
    return Path(path)


def _write_model_index(path: Path, components: dict[str, Any]) -> None:
    import json

    import diffusers

    index: dict[str, Any] = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__}
    for name, module in components.items():
        library = "diffusers" if type(module).__module__.startswith("diffusers") else "transformers"
        index[name] = [None, None] if module is None else [library, type(module).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
