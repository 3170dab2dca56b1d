"""Z-Image: a ``ZImageTransformer2DModel`` on the shared flow layer (:mod:`diffalign.models.flow`).

What is Z-Image's own, each taken from diffusers' ``pipelines/z_image/pipeline_z_image.py`` (``ZImagePipeline``) so
that it cannot drift from it:

* **Text conditioning** is ``ZImagePipeline.encode_prompt`` itself (without its negative branch), called on a
  pipeline that holds only the Qwen3 text encoder and its tokenizer, on a copy of the prompt list (``_encode_prompt``
  writes the chat-templated strings back into the list it is given). It returns one ``(L_i, D)`` tensor per prompt:
  the penultimate hidden layer at the prompt's unpadded tokens, ``L_i <= model.max_sequence_length`` (the
  tokenizer's ``max_length``; the pipeline's default is 512). The conditioning dict holds them zero-padded to that
  fixed length, ``cap_feats`` ``(N, max_sequence_length, D)``, with ``cap_lens`` ``(N,)``, so that prompts batch,
  cache and concatenate like any backbone's; the transformer call cuts the padding off again and passes the list
  (the transformer has no caption mask: padding rows would be read as caption tokens).
* **Latents** stay ``(B, C, H, W)`` in float32 (the VAE's ``(z − shift_factor)·scaling_factor``, 16 channels on the
  released model; ``ZImagePipeline.prepare_latents``); the transformer takes them as a list of ``(C, 1, H, W)``
  (``latents.unsqueeze(2).unbind(0)`` in ``ZImagePipeline.__call__``) and patchifies 2×2 itself, so the image size
  must be a multiple of 2 × the VAE factor, as ``__call__`` checks.
* **Timesteps** reach the transformer as ``(1000 − t) / 1000 = 1 − σ`` in float32 (1 = clean), and its output is
  the negated velocity: ``__call__`` negates the stacked output before the scheduler step. :meth:`_denoise` does
  both, so the adapter's prediction is the velocity ``v = ε − x0`` like every flow backbone's, and training targets
  it exactly as diffusers' ``examples/dreambooth/train_dreambooth_lora_z_image.py`` does.
* **Sampling sigmas** are ``get_default_z_image_sigmas(S)`` (``torch.linspace(1, 1/S, S)``: its float32 values,
  which differ from the float64 linspace of the other flow pipelines in the last bit) under the scheduler's shift;
  ``mu`` from ``(h/2)·(w/2)`` is passed as ``__call__`` passes it, and only a scheduler with
  ``use_dynamic_shifting`` uses it (the released one has a static shift of 3).
* **Classifier-free guidance.** Our rollouts use the standard ``u + w·(c − u)`` (empty negative prompt, one batched
  call of ``[uncond; cond]``). ``__call__`` computes ``c + s·(c − u)`` when ``guidance_scale = s > 0``, which is the
  same with ``w = s + 1``: our guidance scale ``w`` is the pipeline's ``guidance_scale = w − 1`` (``w = 1``, no
  guidance, is the pipeline's ``guidance_scale = 0``, the Turbo model's setting). The pipeline's optional
  ``cfg_normalization`` (off by default) and ``cfg_truncation`` (no effect at its default 1.0) are not reproduced.

Training timesteps follow the flow layer: the density over the scheduler's training grid, which the static shift 3
of the released scheduler config shapes (as in diffusers' Z-Image LoRA script, which indexes the scheduler's
``timesteps``).

LoRA targets (:data:`Z_IMAGE_LORA_TARGETS`): the attention projections ``to_q/k/v`` and ``to_out.0``, diffusers'
Z-Image LoRA script default; the model is single-stream, so they cover every attention layer (noise refiner,
context refiner and main layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from diffalign.models.backbones import backbone_loader
from diffalign.models.components import Source, eval_modules
from diffalign.models.diffusion import check_conditioning, check_prompts, unwrap
from diffalign.models.flow import FlowMatchingAdapter, check_flow_prediction, register_flow_backbone

#: The subfolders a Z-Image pipeline folder must have (the VAE is optional here, as for every backbone).
SUBFOLDERS = ("transformer", "scheduler", "text_encoder", "tokenizer")
#: The attention projections of every block (diffusers' Z-Image LoRA script default).
Z_IMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: The transformer's time input is (1000 − t) / 1000 (ZImagePipeline.__call__).
_TIMESTEP_SCALE = 1000.0


class ZImageAdapter(FlowMatchingAdapter):
    """Z-Image (see the module docstring): ``max_sequence_length`` is the tokenizer's ``max_length`` and the fixed
    length of the stored caption features."""

    text_pipeline_class = ZImagePipeline
    token_patch = 2
    pipeline_class_name = "ZImagePipeline"

    def __init__(
        self,
        transformer: ZImageTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        vae: AutoencoderKL | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        max_sequence_length: int = 512,
        **training: Any,
    ) -> None:
        super().__init__(transformer, scheduler, vae=vae, **training)
        self.hold_text(max_sequence_length, text_encoder=text_encoder, tokenizer=tokenizer)

    # ----- latents and schedule -----

    def pipeline_sigmas(self, steps: int) -> Sequence[float]:
        """``get_default_z_image_sigmas(S)``: ``ZImagePipeline.__call__``'s float32 ``torch.linspace(1, 1/S, S)``,
        which differs from float64 ``np.linspace`` in the last bit for most S."""
        return get_default_z_image_sigmas(steps)

    # ----- text -----

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"cap_feats": (N, max_sequence_length, D), "cap_lens": (N,) long}``: ``ZImagePipeline.encode_prompt``'s
        per-prompt features (no negatives), zero-padded to the fixed length, and each prompt's token count."""
        prompts = check_prompts(prompts)
        device = next(self.text_encoder.parameters()).device if self.text_encoder is not None else None
        embeds, _ = self.text_pipeline().encode_prompt(
            list(prompts),  # a copy: encode_prompt writes the templated prompts into the list
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        first = embeds[0]
        feats = first.new_zeros(len(embeds), self.max_sequence_length, first.shape[-1])
        for i, row in enumerate(embeds):
            feats[i, : row.shape[0]] = row
        lens = torch.tensor([row.shape[0] for row in embeds], dtype=torch.long, device=first.device)
        return {"cap_feats": feats, "cap_lens": lens}

    # ----- the transformer call -----

    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        check_conditioning(cond, ("cap_feats", "cap_lens"), x_t.shape[0], "Z-Image")
        param = next(unwrap(model).parameters())
        device, dtype = param.device, param.dtype
        feats, lens = cond["cap_feats"], cond["cap_lens"]
        lengths = [int(n) for n in lens.tolist()]
        if min(lengths) < 1 or max(lengths) > feats.shape[1]:
            raise ValueError(f"cap_lens {lengths} must lie in [1, {feats.shape[1]}] (the stored caption length)")
        feats = feats.to(device=device, dtype=dtype)
        out = model(
            x=list(x_t.to(device=device, dtype=dtype).unsqueeze(2).unbind(0)),
            t=(_TIMESTEP_SCALE - timesteps.to(device=device, dtype=torch.float32)) / _TIMESTEP_SCALE,
            cap_feats=[feats[i, :n] for i, n in enumerate(lengths)],
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)


def build_z_image(
    src: Source,
    *,
    max_sequence_length: int = 512,
    timestep_density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    prediction_type: str | None = None,
) -> ZImageAdapter:
    """Load a Z-Image pipeline's transformer, flow-matching scheduler, Qwen3 text encoder and tokenizer (and VAE).
    ``prediction_type`` may only be ``None`` or ``"flow"`` (Z-Image predicts the flow velocity)."""
    check_flow_prediction(prediction_type, "Z-Image")
    vae = src.vae()
    transformer = src.diffusers(ZImageTransformer2DModel, "transformer")
    text_encoder = src.transformers(AutoModel, "text_encoder")
    eval_modules(transformer, text_encoder, vae)
    return ZImageAdapter(
        transformer,
        src.config_only(FlowMatchEulerDiscreteScheduler, "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=src.config_only(AutoTokenizer, "tokenizer"),
        max_sequence_length=max_sequence_length,
        timestep_density=timestep_density,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )


Z_IMAGE = register_flow_backbone("z_image", build_z_image, SUBFOLDERS, "ZImageTransformer2DModel", Z_IMAGE_LORA_TARGETS)
load_z_image_adapter = backbone_loader(Z_IMAGE)
