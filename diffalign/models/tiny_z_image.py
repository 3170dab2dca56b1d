"""A tiny, randomly initialised Z-Image pipeline built from configs (no downloads), for tests and benchmarks.

Components are those of diffusers' ``ZImagePipeline`` at toy sizes: a ``ZImageTransformer2DModel`` of width 32 (two
main layers, one noise and one context refiner, RoPE axes 8/4/4 with the released axis lengths 1024/512/512), a
two-level ``AutoencoderKL`` with the released (FLUX) VAE's 16 latent channels, ``scaling_factor`` 0.3611 and
``shift_factor`` 0.1159 and no quant convs, and a two-layer ``Qwen3Model`` (width 32) as the text encoder.

The tokenizer is :func:`~diffalign.models.tiny_qwen_image.build_qwen_tokenizer` (Qwen's byte-level BPE
pre-tokenizer and special tokens, a small vocabulary learnt locally; Qwen3's own cannot be downloaded) with a chat
template reduced from Qwen3's to plain role/content messages: for one user message and
``add_generation_prompt=True`` it renders ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``, plus
the empty ``<think>`` block when ``enable_thinking=False``, as Qwen3's does; tool calls and reasoning content are not
supported. Token ids and the vocabulary size differ from the release.

The scheduler is ``FlowMatchEulerDiscreteScheduler`` with the released ``Tongyi-MAI/Z-Image-Turbo`` scheduler config
(``num_train_timesteps`` 1000, static ``shift`` 3.0, no dynamic shifting), the values ostris/ai-toolkit
(``extensions_built_in/diffusion_models/z_image/z_image.py``) hard-codes for Z-Image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from diffalign.models.tiny_qwen_image import build_qwen_tokenizer

Z_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
Z_IMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
Z_IMAGE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def tiny_z_image_components(*, sample_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """``{"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}`` for a tiny Z-Image model.

    ``sample_size`` is the image side in pixels; it must be a multiple of 4 (the VAE downsamples by 2 and the
    transformer patchifies 2x2). The transformer's caption width equals the text encoder's hidden size (32). Its
    ``x_pad_token`` / ``cap_pad_token`` (left uninitialised by the class) are drawn from the seeded generator.
    """
    if sample_size % 4:
        raise ValueError(f"sample_size must be a multiple of 4 (VAE factor 2 x patch 2), got {sample_size}")
    tokenizer = build_qwen_tokenizer(chat_template=Z_IMAGE_CHAT_TEMPLATE)
    text_hidden = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=text_hidden,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=[8, 4, 4],
            axes_lens=[1024, 512, 512],
        )
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=32,
            sample_size=sample_size,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=text_hidden,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=2048,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                bos_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for module in (transformer, vae, text_encoder):
        module.eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER_CONFIG),
    }


def save_tiny_z_image_pipeline(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Build :func:`tiny_z_image_components` and write it with ``ZImagePipeline.save_pretrained``; the folder loads
    back offline with ``ZImagePipeline.from_pretrained(path)``."""
    ZImagePipeline(**tiny_z_image_components(**kwargs)).save_pretrained(path, safe_serialization=True)
    return Path(path)
