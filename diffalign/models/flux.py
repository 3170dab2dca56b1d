"""FLUX.1 (dev and schnell): a ``FluxTransformer2DModel`` on the shared flow layer (:mod:`diffalign.models.flow`).

What is FLUX's own, each taken from diffusers' ``pipelines/flux/pipeline_flux.py`` (``FluxPipeline``) so that it
cannot drift from it:

* **Text conditioning** is ``FluxPipeline.encode_prompt`` itself, called on a pipeline that holds only the two text
  encoders: the CLIP-L pooled output (``pooled_projections``) and the T5 sequence (``encoder_hidden_states``,
  ``model.max_sequence_length`` tokens; the pipeline's default is 512); ``txt_ids`` are zeros, one row per token.
* **Latents** stay ``(B, C, H, W)`` (the VAE's ``(z − shift_factor)·scaling_factor``, 16 channels on the released
  models); the transformer call packs them into 2×2 patches (``FluxPipeline._pack_latents``: ``(B, H/2·W/2, 4C)``)
  with ``img_ids`` from ``FluxPipeline._prepare_latent_image_ids`` and unpacks its output
  (``FluxPipeline._unpack_latents``), so the image size must be a multiple of 2 × the VAE factor.
* **Timesteps** reach the transformer as ``t / 1000`` (``FluxPipeline.__call__``), i.e. σ.
* **Guidance.** FLUX.1-dev is guidance-distilled: ``guidance_embeds`` is set, and every call (rollouts and training)
  passes ``guidance = model.guidance`` (diffusers' default 3.5) as the pipeline does, with no classifier-free
  guidance on top. FLUX.1-schnell has no guidance embedding and takes none. Neither uses CFG (:attr:`uses_cfg`).
* **Sampling sigmas** are the pipeline's ``linspace(1, 1/S, S)`` under the scheduler's dynamic shift
  (``use_dynamic_shifting``: dev), ``mu`` from the packed image-token count (:meth:`image_seq_len`), or its static
  shift (schnell: 1.0).

Training timesteps follow diffusers' ``examples/dreambooth/train_dreambooth_flux.py``: the density over the
scheduler's training grid, which a dynamically shifted scheduler leaves unshifted.

LoRA targets (:data:`FLUX_LORA_TARGETS`) cover the double-stream blocks (image and text attention with
``add_*_proj`` / ``to_add_out``, both feed-forwards: diffusers' ``train_dreambooth_lora_flux.py`` list) and the
single-stream blocks (``attn.to_q/k/v``, matched by the same names, ``proj_mlp`` and ``proj_out``; ``proj_out`` also
names the transformer's final projection, which is therefore adapted too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import Tensor
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

from diffalign.models.backbones import backbone_loader
from diffalign.models.components import Source, eval_modules
from diffalign.models.diffusion import check_conditioning, check_prompts, unwrap
from diffalign.models.flow import FlowMatchingAdapter, check_flow_prediction, register_flow_backbone

#: The subfolders a FLUX pipeline folder must have (the VAE is optional here, as for every backbone).
SUBFOLDERS = ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
#: Double-stream attention and feed-forwards (diffusers' FLUX LoRA script) and the single-stream blocks' layers.
FLUX_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)
#: The transformer's timestep input is t / 1000 (FluxPipeline.__call__).
_TIMESTEP_SCALE = 1000.0


class FluxAdapter(FlowMatchingAdapter):
    """FLUX.1-dev / -schnell (see the module docstring): ``guidance`` is the distilled guidance embedding's value,
    used only when the transformer has one (``guidance_embeds``)."""

    uses_cfg = False
    text_pipeline_class = FluxPipeline
    max_text_tokens = 512  # FLUX's T5 (FluxPipeline._get_t5_prompt_embeds)
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    token_patch = 2
    packed_channels = True
    pipeline_class_name = "FluxPipeline"

    def pipeline_sigmas(self, steps: int) -> Sequence[float]:
        return self.linspace_sigmas(steps)

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        vae: AutoencoderKL | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: Any | None = None,
        max_sequence_length: int = 512,
        guidance: float = 3.5,
        **training: Any,
    ) -> None:
        super().__init__(transformer, scheduler, vae=vae, **training)
        texts = {"text_encoder": text_encoder, "tokenizer": tokenizer}
        self.hold_text(max_sequence_length, **texts, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.guidance = float(guidance)

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer is guidance-distilled (FLUX.1-dev) and takes ``guidance``."""
        return bool(unwrap(self.denoiser).config.guidance_embeds)

    # ----- latents -----

    # ----- text -----

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (N, max_sequence_length, D), "pooled_projections": (N, P)}`` from
        ``FluxPipeline.encode_prompt`` (``prompt_2`` = ``prompt``, one image per prompt)."""
        prompts = check_prompts(prompts)
        pipe = self.text_pipeline()
        device = next(self.text_encoder_2.parameters()).device
        embeds, pooled, _ = pipe.encode_prompt(
            list(prompts), device=device, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    # ----- the transformer call -----

    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        check_conditioning(cond, ("encoder_hidden_states", "pooled_projections"), x_t.shape[0], "FLUX")
        param = next(unwrap(model).parameters())
        device, dtype = param.device, param.dtype
        b, c, h, w = x_t.shape
        embeds = cond["encoder_hidden_states"].to(device=device, dtype=dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=device, dtype=torch.float32)
        out = model(
            hidden_states=FluxPipeline._pack_latents(x_t.to(device=device, dtype=dtype), b, c, h, w),
            timestep=timesteps.to(device=device, dtype=dtype) / _TIMESTEP_SCALE,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(device=device, dtype=dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)


def build_flux(
    src: Source,
    *,
    max_sequence_length: int = 512,
    guidance: float = 3.5,
    timestep_density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    prediction_type: str | None = None,
) -> FluxAdapter:
    """Load a FLUX.1 pipeline's transformer, flow-matching scheduler, CLIP-L, T5 and their tokenizers (and VAE).
    ``prediction_type`` may only be ``None`` or ``"flow"`` (FLUX predicts the flow velocity)."""
    check_flow_prediction(prediction_type, "FLUX")
    vae = src.vae()
    transformer = src.diffusers(FluxTransformer2DModel, "transformer")
    text_encoder = src.transformers(CLIPTextModel, "text_encoder")
    text_encoder_2 = src.transformers(T5EncoderModel, "text_encoder_2")
    eval_modules(transformer, text_encoder, text_encoder_2, vae)
    return FluxAdapter(
        transformer,
        src.config_only(FlowMatchEulerDiscreteScheduler, "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=src.config_only(CLIPTokenizer, "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=src.config_only(AutoTokenizer, "tokenizer_2"),
        max_sequence_length=max_sequence_length,
        guidance=guidance,
        timestep_density=timestep_density,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )


FLUX = register_flow_backbone("flux", build_flux, SUBFOLDERS, "FluxTransformer2DModel", FLUX_LORA_TARGETS)
load_flux_adapter = backbone_loader(FLUX)
