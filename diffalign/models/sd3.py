"""SD3 adapter: an MMDiT ``SD3Transformer2DModel`` trained by rectified flow matching.

Noising, target, training timesteps and sampling schedules are the shared flow layer's
(:mod:`diffalign.models.flow`, as diffusers' ``examples/dreambooth/train_dreambooth_sd3.py`` and ``yifan123/flow_grpo``
``scripts/train_sd3_dpo.py``): ``x_t = (1 − σ)·x0 + σ·ε``, target ``v = ε − x0``, the transformer's timestep
``t = σ·T`` on the scheduler's shifted grid (shift 3.0 for SD3 / SD3.5).

Text conditioning is ``StableDiffusion3Pipeline.encode_prompt``: ``hidden_states[-2]`` of CLIP-L and CLIP-G,
concatenated on features and zero-padded to the T5 width, then concatenated on the sequence axis with the T5
embeddings — or, without T5, with zeros of shape (N, ``max_sequence_length``, ``joint_attention_dim``) as diffusers
uses; ``pooled_projections`` = both CLIPs' projected pooled outputs concatenated.

The module also holds the backbone's build function, its registry entry (``sd3``: a pipeline with a
``transformer``) and its public loader, :func:`load_sd3_adapter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from diffalign.models.backbones import BUILTIN_CACHE_OPTIONS, Backbone, backbone_loader, register_backbone
from diffalign.models.components import Source, eval_modules
from diffalign.models.diffusion import check_conditioning, check_prompts, unwrap
from diffalign.models.flow import FlowMatchingAdapter, check_flow_prediction

#: The subfolders an SD3 pipeline folder must have (a VAE and T5, ``text_encoder_3`` / ``tokenizer_3``, are optional).
SUBFOLDERS = ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class SD3Adapter(FlowMatchingAdapter):
    """Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` + ``FlowMatchEulerDiscreteScheduler`` (+ VAE, 2–3 text
    encoders) on the shared flow layer (:class:`~diffalign.models.flow.FlowMatchingAdapter`). Without a VAE the
    transformer works on pixels (the toy flow model)."""

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        vae: AutoencoderKL | None = None,
        text_encoder: torch.nn.Module | None = None,
        text_encoder_2: torch.nn.Module | None = None,
        text_encoder_3: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        tokenizer_2: Any | None = None,
        tokenizer_3: Any | None = None,
        max_sequence_length: int = 77,
        **training: Any,
    ) -> None:
        super().__init__(transformer, scheduler, vae=vae, **training)
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length}: must be positive")
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.max_sequence_length = max_sequence_length
        for frozen in (text_encoder, text_encoder_2, text_encoder_3):
            if frozen is not None:
                frozen.requires_grad_(False)

    pipeline_class_name = "StableDiffusion3Pipeline"

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, *self._text_modules()) if m is not None]

    def _text_modules(self) -> tuple[torch.nn.Module | None, ...]:
        return self.text_encoder, self.text_encoder_2, self.text_encoder_3

    # ----- encoders -----

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (N, 77 + max_sequence_length, D), "pooled_projections": (N, P)}``
        (:func:`sd3_prompt_embeds`)."""
        prompts = check_prompts(prompts)
        clips = [(self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)]
        if any(enc is None or tok is None for enc, tok in clips):
            raise RuntimeError("SD3Adapter needs text_encoder/tokenizer and text_encoder_2/tokenizer_2 (load_adapter)")
        if self.text_encoder_3 is not None and self.tokenizer_3 is None:
            raise RuntimeError("SD3Adapter has text_encoder_3 but no tokenizer_3")
        embeds, pooled = sd3_prompt_embeds(
            [enc for enc, _ in clips],
            [tok for _, tok in clips],
            prompts,
            joint_attention_dim=int(unwrap(self.denoiser).config.joint_attention_dim),
            max_sequence_length=self.max_sequence_length,
            t5_encoder=self.text_encoder_3,
            t5_tokenizer=self.tokenizer_3,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        check_conditioning(cond, ("encoder_hidden_states", "pooled_projections"), x_t.shape[0], "SD3")
        param = next(unwrap(model).parameters())
        return model(
            hidden_states=x_t.to(device=param.device, dtype=param.dtype),
            timestep=timesteps.to(param.device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device=param.device, dtype=param.dtype),
            pooled_projections=cond["pooled_projections"].to(device=param.device, dtype=param.dtype),
            return_dict=False,
        )[0]


def _token_ids(tokenizer: Any, prompts: Sequence[str], max_length: int) -> Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


def sd3_prompt_embeds(
    clip_encoders: Sequence[torch.nn.Module],
    clip_tokenizers: Sequence[Any],
    prompts: Sequence[str],
    *,
    joint_attention_dim: int,
    max_sequence_length: int,
    t5_encoder: torch.nn.Module | None = None,
    t5_tokenizer: Any | None = None,
) -> tuple[Tensor, Tensor]:
    """``(prompt_embeds, pooled_projections)`` exactly as ``StableDiffusion3Pipeline.encode_prompt`` (``clip_skip``
    None, one image per prompt):

        clip   = pad(cat([hidden_states[-2] of each CLIP], -1), T5 width)    (each CLIP padded to its max length)
        embeds = cat([clip, T5(prompts)[0]  or  zeros(N, max_sequence_length, joint_attention_dim)], dim=1)
        pooled = cat([out[0] of each CLIP], -1)                               (the projected pooled outputs)

    Hidden states are cast to the first encoder's dtype and device, as the pipeline does. Shared by
    :class:`SD3Adapter` and the toy flow model (:mod:`diffalign.toy.flow_model`)."""
    dtype, device = next(clip_encoders[0].parameters()).dtype, next(clip_encoders[0].parameters()).device
    hidden, pooled = [], []
    for encoder, tokenizer in zip(clip_encoders, clip_tokenizers, strict=True):
        ids = _token_ids(tokenizer, prompts, tokenizer.model_max_length)
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].to(device, dtype))
        pooled.append(out[0].to(device))
    clip = torch.cat(hidden, dim=-1)
    if t5_encoder is None:
        t5 = torch.zeros(len(prompts), max_sequence_length, joint_attention_dim, dtype=dtype, device=device)
    else:
        ids = _token_ids(t5_tokenizer, prompts, max_sequence_length)
        t5 = t5_encoder(ids.to(next(t5_encoder.parameters()).device))[0].to(device=device, dtype=dtype)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def build_sd3(
    src: Source,
    *,
    load_t5: bool = True,
    max_sequence_length: int = 77,
    timestep_density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    prediction_type: str | None = None,
) -> SD3Adapter:
    """Load an SD3 / SD3.5 pipeline's transformer, flow-matching scheduler, CLIP-L, CLIP-G (and T5 unless
    ``load_t5=False`` or the pipeline has none: zeros replace its embeddings, as in diffusers) and VAE.

    ``prediction_type`` may only be ``None`` or ``"flow"``: SD3 always predicts the flow velocity (the argument is
    there so that ``model.prediction_type`` reaches every backbone's loader the same way)."""
    check_flow_prediction(prediction_type, "SD3")
    vae = src.vae()
    transformer = src.diffusers(SD3Transformer2DModel, "transformer")
    text_encoder = src.transformers(CLIPTextModelWithProjection, "text_encoder")
    text_encoder_2 = src.transformers(CLIPTextModelWithProjection, "text_encoder_2")
    text_encoder_3 = tokenizer_3 = None
    if load_t5 and src.has("text_encoder_3"):
        text_encoder_3 = src.transformers(T5EncoderModel, "text_encoder_3")
        tokenizer_3 = src.config_only(AutoTokenizer, "tokenizer_3")
    eval_modules(transformer, text_encoder, text_encoder_2, text_encoder_3, vae)
    return SD3Adapter(
        transformer,
        src.config_only(FlowMatchEulerDiscreteScheduler, "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3,
        tokenizer=src.config_only(CLIPTokenizer, "tokenizer"),
        tokenizer_2=src.config_only(CLIPTokenizer, "tokenizer_2"),
        tokenizer_3=tokenizer_3,
        max_sequence_length=max_sequence_length,
        timestep_density=timestep_density,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )


SD3 = register_backbone(
    Backbone(
        name="sd3",
        build=build_sd3,
        required=SUBFOLDERS,
        detect="transformer",
        priority=20,
        cache_options=BUILTIN_CACHE_OPTIONS,
    )
)
load_sd3_adapter = backbone_loader(SD3)
