"""The toy flow base model: a pixel-space SD3-style (MMDiT, rectified flow) text-to-image model for 2 CPU cores.

The flow-matching twin of :mod:`diffalign.toy.model`, with the components and conditioning of Stable Diffusion 3
(Esser et al., 2024) minus the T5 encoder and the VAE:

* Transformer: diffusers ``SD3Transformer2DModel`` on 16×16×3 pixels (no VAE), patch size 2 (an 8×8 grid of 64 image
  tokens), width 96 (3 heads of 32), 3 joint (MMDiT) blocks, RMS q/k norm (as SD3.5); ≈ 0.97M parameters.
  ``joint_attention_dim`` is 128, twice the concatenated CLIP width of 64, as SD3's 4096 is twice its 2048 (CLIP-L
  768 + CLIP-G 1280). Measured (same 3000-step budget, one CPU thread): width 64 × 6 blocks (0.89M) trained ~1.4×
  slower per step and drew rougher shapes (shape adherence 0.46 vs 0.50 at lr 1e-3); with q/k norm and lr 3e-3 shape
  adherence rose to 0.73 (ODE sampler; see :mod:`diffalign.toy.flow_pretrain`).
* Text encoders: two tiny ``CLIPTextModelWithProjection`` (``text_encoder``, ``text_encoder_2``; hidden 32, 2 layers,
  2 heads, 8 positions, projection 32, initialised from different seeds) over SD's real CLIP BPE vocabulary (built
  offline by :func:`diffalign.models.clip_tokenizer.build_clip_tokenizer`). As in the UNet toy they stay at their
  seeded random init (frozen; see :mod:`diffalign.toy.pretrain` for the measured reason).
* Conditioning, exactly ``StableDiffusion3Pipeline.encode_prompt`` (diffusers 0.42) without T5 (see
  :func:`encode_prompts`): per encoder the penultimate hidden state (``hidden_states[-2]``) and the projected pooled
  output (``text_embeds``); the two hidden states are concatenated on features, zero-padded to ``joint_attention_dim``
  and followed on the sequence axis by ``max_sequence_length`` zero tokens (the pipeline's T5 stand-in when
  ``text_encoder_3`` is None; 8 here instead of the pipeline's default 256); ``pooled_projections`` is the
  concatenation of the two pooled vectors (``pooled_projection_dim = 32 + 32``).
* Noise schedule: ``FlowMatchEulerDiscreteScheduler`` with 1000 training steps and ``shift = 1`` (no shift). SD3
  shifts toward high noise for high resolutions (shift 3 at 1024², i.e. 128² × 16 latent values; Esser et al. §5.3.2
  scale it with sqrt of the number of values); a 16×16×3 image has 768 values, below SD3's 256² reference, where the
  paper's rule gives no shift (or a shift below 1).

Rectified flow (Liu et al., 2022; Esser et al., 2024): ``x_σ = (1 - σ)·x0 + σ·ε``, the transformer predicts the
velocity ``v ≈ ε - x0`` and is called with ``timestep = σ · 1000``.

:func:`save_toy_flow_model` writes the diffusers folder layout of SD3 (``transformer/``, ``scheduler/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``model_index.json`` with ``vae``,
``text_encoder_3`` and ``tokenizer_3`` set to ``[null, null]``, i.e. pixel space and no T5), so any generic
``X.from_pretrained(path, subfolder=...)`` loader reads it. ``model_index.json["diffalign"]`` carries
``max_sequence_length`` (the T5 stand-in length) with the pretraining info.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from diffalign.models.clip_tokenizer import build_clip_tokenizer
from diffalign.models.sd3 import sd3_prompt_embeds
from diffalign.toy.model import MAX_TOKENS, TEXT_HIDDEN, _write_tokenizer, text_encoder_config
from diffalign.toy.world import RESOLUTION

PROJECTION_DIM = TEXT_HIDDEN  # each CLIP's projection: text_encoder_config() of the UNet toy, shared
JOINT_ATTENTION_DIM = 128
T5_TOKENS = 8
PIPELINE_CLASS = "DiffalignToyFlowPipeline"
COMPONENTS: tuple[str, ...] = ("transformer", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def transformer_config() -> dict:
    """Keyword arguments of the toy ``SD3Transformer2DModel`` (``caption_projection_dim`` must equal the width
    ``num_attention_heads · attention_head_dim``: the joint blocks attend over both streams at that width)."""
    return {
        "sample_size": RESOLUTION,
        "patch_size": 2,
        "in_channels": 3,
        "out_channels": 3,
        "num_layers": 3,
        "attention_head_dim": 32,
        "num_attention_heads": 3,
        "joint_attention_dim": JOINT_ATTENTION_DIM,
        "caption_projection_dim": 96,
        "pooled_projection_dim": 2 * PROJECTION_DIM,
        "pos_embed_max_size": RESOLUTION // 2,
        "qk_norm": "rms_norm",
    }


def scheduler_config() -> dict:
    """Config of the ``FlowMatchEulerDiscreteScheduler`` (training and sampling)."""
    return {"num_train_timesteps": 1000, "shift": 1.0}


@dataclass
class ToyFlowModel:
    """The components of the toy flow text-to-image model (CPU, float32)."""

    transformer: SD3Transformer2DModel
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: FlowMatchEulerDiscreteScheduler
    max_sequence_length: int = T5_TOKENS

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [N, 8 + max_sequence_length, 128], pooled_projections [N, 64])`` (see
        :func:`encode_prompts`)."""
        return encode_prompts(
            (self.text_encoder, self.text_encoder_2),
            (self.tokenizer, self.tokenizer_2),
            prompts,
            joint_attention_dim=self.transformer.config.joint_attention_dim,
            max_sequence_length=self.max_sequence_length,
        )

    def predict(
        self,
        x_t: torch.Tensor,
        sigma: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity ``v_θ(x_σ, σ, c)`` (see :func:`predict_velocity`)."""
        return predict_velocity(self.transformer, x_t, sigma, prompt_embeds, pooled_projections)


def encode_prompts(
    text_encoders: Sequence[CLIPTextModelWithProjection],
    tokenizers: Sequence[CLIPTokenizer],
    prompts: Sequence[str],
    *,
    joint_attention_dim: int = JOINT_ATTENTION_DIM,
    max_sequence_length: int = T5_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 conditioning without T5: ``(prompt_embeds, pooled_projections)``.

    As ``StableDiffusion3Pipeline.encode_prompt`` (diffusers 0.42, ``clip_skip=None``, ``text_encoder_3=None``), with
    ``out_k = text_encoder_k(ids_k, output_hidden_states=True)`` and ``ids_k`` padded to the tokenizer's length::

        clip   = pad(cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], -1), joint_attention_dim)
        embeds = cat([clip, zeros(N, max_sequence_length, joint_attention_dim)], dim=1)
        pooled = cat([out_1[0], out_2[0]], -1)                  # text_embeds, the projected EOS features

    Shapes ``[N, tokens + max_sequence_length, joint_attention_dim]`` and ``[N, sum of projection dims]``; the dtype
    is the first text encoder's, as in the pipeline.
    """
    if len(text_encoders) != 2 or len(tokenizers) != 2:
        raise ValueError(f"encode_prompts: SD3 uses two CLIP encoders, got {len(text_encoders)} and {len(tokenizers)}")
    clip_width = sum(encoder.config.hidden_size for encoder in text_encoders)
    if clip_width > joint_attention_dim:
        raise ValueError(f"encode_prompts: CLIP width {clip_width} exceeds joint_attention_dim={joint_attention_dim}")
    return sd3_prompt_embeds(
        text_encoders,
        tokenizers,
        prompts,
        joint_attention_dim=joint_attention_dim,
        max_sequence_length=max_sequence_length,
    )


def predict_velocity(
    transformer: SD3Transformer2DModel,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_projections: torch.Tensor,
) -> torch.Tensor:
    """``transformer(hidden_states=x_t, timestep=σ·1000, encoder_hidden_states=..., pooled_projections=...)``, the
    velocity ``v ≈ ε - x0`` (SD3's call; ``sigma`` is a scalar or ``[N]``)."""
    timestep = (torch.as_tensor(sigma, dtype=torch.float32) * 1000.0).to(x_t.device).expand(x_t.shape[0])
    return transformer(
        hidden_states=x_t,
        timestep=timestep,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_projections,
        return_dict=False,
    )[0]


def build_toy_flow_model(seed: int = 0) -> ToyFlowModel:
    """A freshly initialised toy flow model; parameter init is a function of ``seed`` only (the transformer from
    ``seed``, the two text encoders from ``seed`` and ``seed + 1``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_config())
        text_encoder = CLIPTextModelWithProjection(text_encoder_config())
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config())
    return ToyFlowModel(
        transformer=transformer,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(model_max_length=MAX_TOKENS),
        tokenizer_2=build_clip_tokenizer(model_max_length=MAX_TOKENS),
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config()),
    )


def save_toy_flow_model(model: ToyFlowModel, path: str | os.PathLike, extra_info: dict | None = None) -> Path:
    """Write ``model`` as an SD3 diffusers-layout folder (safetensors, float32); ``extra_info`` (e.g. the pretraining
    config and measured metrics) goes into ``model_index.json`` under ``"diffalign"``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(path / "transformer", safe_serialization=True)
    model.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    model.text_encoder_2.save_pretrained(path / "text_encoder_2", safe_serialization=True)
    _write_tokenizer(path / "tokenizer")
    _write_tokenizer(path / "tokenizer_2")
    model.scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": [None, None],
        "vae": [None, None],
        "diffalign": {
            "space": "pixel",
            "resolution": RESOLUTION,
            "prediction": "flow",
            "max_sequence_length": model.max_sequence_length,
            **(extra_info or {}),
        },
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_toy_flow_model(path: str | os.PathLike) -> ToyFlowModel:
    """Load a folder written by :func:`save_toy_flow_model` (float32, CPU, eval mode)."""
    path = Path(path)
    missing = [sub for sub in COMPONENTS if not (path / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path} lacks {missing}: expected a folder written by diffalign.toy.flow_model.save_toy_flow_model "
            "(run diffalign.toy.flow_pretrain.ensure_flow_base() to create one)"
        )
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=torch.float32)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=torch.float32)
    info = json.loads((path / "model_index.json").read_text()).get("diffalign", {})
    for module in (transformer, text_encoder, text_encoder_2):
        module.eval()
    return ToyFlowModel(
        transformer=transformer,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        max_sequence_length=int(info.get("max_sequence_length", T5_TOKENS)),
    )
