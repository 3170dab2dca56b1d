"""A tiny, randomly initialised Qwen-Image pipeline built from configs (no downloads), for tests and benchmarks.

Components are those of diffusers' ``QwenImagePipeline`` at toy sizes: a two-block ``QwenImageTransformer2DModel``
(inner width 32, RoPE axes 8/4/4), an ``AutoencoderKLQwenImage`` that downsamples by 4 (the released one by 8) with
the released 16 latent channels and per-channel ``latents_mean`` / ``latents_std`` (the class defaults), and a
two-layer ``Qwen2_5_VLForConditionalGeneration`` (text width 32, one-block vision tower) as the text encoder.

The tokenizer is a real ``Qwen2Tokenizer`` (Qwen's byte-level BPE pre-tokenizer and special tokens) whose merges are
learnt here, with ``tokenizers``, from a small built-in English word list plus the pipeline's system-prompt template;
Qwen's own 151k-entry vocabulary cannot be downloaded. What differs from the real tokenizer: token ids and the
vocabulary size (under a thousand entries), and words outside the list split into more pieces. What stays: the chat
markers are single special tokens and the template prefix is exactly
``QwenImagePipeline.prompt_template_encode_start_idx`` (34) tokens, so the pipeline drops exactly the system prompt,
as with the released model.

The scheduler is ``FlowMatchEulerDiscreteScheduler`` with the released ``Qwen/Qwen-Image`` scheduler config
(``scheduler/scheduler_config.json``: dynamic exponential shifting, base/max shift 0.5/0.9 over 256..8192 image
tokens, shift_terminal 0.02), as hard-coded for Qwen-Image by ostris/ai-toolkit
(``extensions_built_in/diffusion_models/qwen_image/qwen_image.py``, ``scheduler_config``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

QWEN_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
QWEN_IMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

# Qwen's special tokens, in the order of the released vocabulary (ids 151643..): text, chat, then vision markers.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_WORDS = (
    "a an the of in on at with and or to from by for under over near behind front next top bottom left right "
    "is are was sitting standing holding wearing looking running flying lying floating walking "
    "photo picture painting drawing illustration render portrait landscape close up view shot style "
    "cat dog bird horse fish cow sheep bear lion tiger elephant rabbit fox owl "
    "man woman person child boy girl people face hand hat shirt dress "
    "car bus bike train boat plane house building city street road bridge tower castle room kitchen "
    "tree flower grass forest mountain river lake sea ocean beach sky cloud sun moon star snow rain "
    "table chair bed cup bottle book clock lamp window door sign apple banana cake pizza "
    "red green blue yellow orange purple pink black white gray brown gold silver "
    "big small large tiny tall short old new young happy beautiful bright dark night day "
    "one two three four five many some this that it hello world says"
)


def build_qwen_tokenizer(
    *, model_max_length: int = 32768, extra_text: tuple[str, ...] = (), chat_template: str | None = None
) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` with Qwen's pre-tokenizer and special tokens and a small BPE vocabulary learnt from a
    built-in word list, the Qwen-Image prompt template and ``extra_text``. Deterministic; pad is ``<|endoftext|>``,
    eos ``<|im_end|>`` (as in the Qwen2.5-VL / Qwen3 releases), padding on the right."""
    marker = "|".join(re.escape(token) for token in QWEN_SPECIAL_TOKENS)
    corpus = [piece for text in (_QWEN_IMAGE_TEMPLATE, _WORDS, *extra_text) for piece in re.split(marker, text)]
    corpus += [" " + word for word in _WORDS.split()] + [word.capitalize() for word in _WORDS.split()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    learnt = json.loads(bpe.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(merge) for merge in learnt["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
        chat_template=chat_template,
    )


def tiny_qwen_image_components(*, sample_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """``{"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}`` for a tiny Qwen-Image model.

    ``sample_size`` is the image side in pixels the model is meant for; no Qwen-Image component stores an image size,
    so it is only checked to be a multiple of 8 (the VAE downsamples by 4 and the transformer packs 2x2 latent
    patches). The transformer reads 64-channel tokens (16 latent channels x 2x2) and its
    joint attention width equals the text encoder's hidden size (32).
    """
    if sample_size % 8:
        raise ValueError(f"sample_size must be a multiple of 8 (VAE factor 4 x patch 2), got {sample_size}")
    tokenizer = build_qwen_tokenizer()
    text_hidden, z_dim = 32, 16
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=z_dim * 4,
            out_channels=z_dim,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_hidden,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(
            base_dim=16,
            z_dim=z_dim,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
        )
        torch.manual_seed(seed + 2)
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": text_hidden,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
                "bos_token_id": special["<|endoftext|>"],
                "eos_token_id": special["<|im_end|>"],
                "pad_token_id": special["<|endoftext|>"],
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": text_hidden,
                "fullatt_block_indexes": [0],
            },
            image_token_id=special["<|image_pad|>"],
            video_token_id=special["<|video_pad|>"],
            vision_start_token_id=special["<|vision_start|>"],
            vision_end_token_id=special["<|vision_end|>"],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    for module in (transformer, vae, text_encoder):
        module.eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
    }


def save_tiny_qwen_image_pipeline(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Build :func:`tiny_qwen_image_components` and write it with ``QwenImagePipeline.save_pretrained``; the folder
    loads back offline with ``QwenImagePipeline.from_pretrained(path)``."""
    QwenImagePipeline(**tiny_qwen_image_components(**kwargs)).save_pretrained(path, safe_serialization=True)
    return Path(path)
