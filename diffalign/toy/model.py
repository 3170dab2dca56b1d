"""The toy base model: a pixel-space SD-style text-to-image diffusion model small enough to train on 2 CPU cores.

* UNet: diffusers ``UNet2DConditionModel`` on 16×16×3 pixels (no VAE), ``block_out_channels=(32, 64)``, one
  ``layers_per_block``, cross-attention at the 8×8 level (down, mid and up blocks); ≈ 0.99M parameters.
* Text encoder: a tiny ``CLIPTextModel`` (hidden 32, 2 layers, 2 heads, 8 positions) over SD's real CLIP BPE vocabulary
  (49408 tokens, built offline by :func:`diffalign.models.clip_tokenizer.build_clip_tokenizer`). The hidden size is
  32 rather than 64 because the 49408-row embedding table dominates the checkpoint size (6.3 MB at 32). The base keeps
  it at its seeded random init (frozen, see :mod:`diffalign.toy.pretrain` for the measured reason); it is a fixed,
  deterministic text featurizer whose colour and shape words give distinct features.
* Noise schedule: ``DDPMScheduler`` with 1000 steps, linear betas 1e-4..0.02 (Ho et al., 2020), epsilon prediction,
  "trailing" timestep spacing so that a 20-step sampler starts at t = 999 (Lin et al., 2024).

:func:`save_toy_model` writes the diffusers folder layout (``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``model_index.json`` with ``vae: [null, null]``, i.e. pixel space), so any generic
``X.from_pretrained(path, subfolder=...)`` loader reads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffalign.models.clip_tokenizer import build_clip_tokenizer, write_clip_vocab
from diffalign.toy.world import RESOLUTION

MAX_TOKENS = 8
TEXT_HIDDEN = 32
PIPELINE_CLASS = "DiffalignToyPixelPipeline"


def unet_config() -> dict:
    """Keyword arguments of the toy ``UNet2DConditionModel``."""
    return {
        "sample_size": RESOLUTION,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": TEXT_HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def text_encoder_config() -> CLIPTextConfig:
    """Config of the tiny ``CLIPTextModel`` (SD's special-token ids: BOS 49406, EOS = pad 49407)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def scheduler_config() -> dict:
    """Config of the training ``DDPMScheduler``; sampling schedulers are built ``from_config`` of it.

    Stable Diffusion's ``scaled_linear`` 0.00085..0.012 schedule: its terminal SNR (4.7e-3 at t = 999) keeps a trace
    of the image at the noisiest step, as in SD. DDPM's ``linear`` 1e-4..0.02 (terminal SNR 4e-5) made the toy's
    Diffusion-DPO / MaPO / DCPO fall below the base under deterministic DDIM (docs/toy-world.md)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "trailing",
    }


@dataclass
class ToyModel:
    """The components of the toy text-to-image model (CPU, float32)."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, MAX_TOKENS]`` (see :func:`tokenize`)."""
        return tokenize(self.tokenizer, prompts)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per-token text features ``[N, MAX_TOKENS, TEXT_HIDDEN]`` (see :func:`encode_prompts`)."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts)


def tokenize(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``[N, model_max_length]``, padded with EOS and truncated, as SD does."""
    return tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """``last_hidden_state`` of the tokenized prompts, ``[N, tokens, hidden]`` (SD's UNet conditioning)."""
    return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device)).last_hidden_state


def build_toy_model(seed: int = 0) -> ToyModel:
    """A freshly initialised toy model; parameter init is a function of ``seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config())
        text_encoder = CLIPTextModel(text_encoder_config())
    return ToyModel(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(model_max_length=MAX_TOKENS),
        scheduler=DDPMScheduler(**scheduler_config()),
    )


def _write_tokenizer(directory: Path) -> None:
    # vocab.json + merges.txt (1.5 MB) instead of tokenizer.save_pretrained's 3.6 MB tokenizer.json.
    write_clip_vocab(directory)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_toy_model(model: ToyModel, path: str | os.PathLike, extra_info: dict | None = None) -> Path:
    """Write ``model`` as a diffusers-layout folder (safetensors, float32); ``extra_info`` (e.g. the pretraining
    config and measured metrics) goes into ``model_index.json`` under ``"diffalign"``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(path / "unet", safe_serialization=True)
    model.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    _write_tokenizer(path / "tokenizer")
    model.scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": [None, None],
        "diffalign": {"space": "pixel", "resolution": RESOLUTION, **(extra_info or {})},
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_toy_model(path: str | os.PathLike) -> ToyModel:
    """Load a folder written by :func:`save_toy_model` (float32, CPU, eval mode)."""
    path = Path(path)
    missing = [sub for sub in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {missing}: expected a folder written by diffalign.toy.model.save_toy_model "
            "(run diffalign.toy.pretrain.ensure_base() to create one)"
        )
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    unet.eval()
    text_encoder.eval()
    return ToyModel(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def read_model_info(path: str | os.PathLike) -> dict:
    """The ``"diffalign"`` entry of a saved model's ``model_index.json`` (pretraining config, metrics)."""
    return json.loads((Path(path) / "model_index.json").read_text()).get("diffalign", {})
