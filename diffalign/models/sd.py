"""The SD 1.x/2.x backbone: its build function, its registry entry and its public loader (the adapter is
:class:`~diffalign.models.diffusion.SDAdapter`).

Detection takes any pipeline that no more specific backbone claims; the scheduler is always a ``DDPMScheduler``
built from the pipeline's scheduler config. :func:`sd_components` reads what SD and SDXL pipelines share.
"""

from __future__ import annotations

from typing import Any

from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffalign.models.backbones import BUILTIN_CACHE_OPTIONS, Backbone, backbone_loader, register_backbone
from diffalign.models.components import Source, eval_modules
from diffalign.models.diffusion import SDAdapter

#: The subfolders an SD pipeline folder must have (a VAE is optional: without one the model works on pixels).
SUBFOLDERS = ("unet", "scheduler", "text_encoder", "tokenizer")


def sd_components(src: Source) -> dict[str, Any]:
    """The components of an SD-style pipeline as :class:`SDAdapter`'s arguments: the UNet and CLIP text encoder (in
    eval mode), the VAE (``None`` without one), the DDPM scheduler and the CLIP tokenizer."""
    vae = src.vae()
    unet = src.diffusers(UNet2DConditionModel, "unet")
    text_encoder = src.transformers(CLIPTextModel, "text_encoder")
    eval_modules(unet, text_encoder, vae)
    return {
        "unet": unet,
        "scheduler": src.config_only(DDPMScheduler, "scheduler"),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": src.config_only(CLIPTokenizer, "tokenizer"),
    }


def build_sd(src: Source, *, prediction_type: str | None = None) -> SDAdapter:
    """Load UNet, DDPM scheduler, CLIP text encoder and tokenizer (and the VAE if there is one) into an SDAdapter;
    ``prediction_type`` overrides the scheduler config's."""
    return SDAdapter(**sd_components(src), prediction_type=prediction_type)


# the fallback (priority 0, detection by default): any pipeline no more specific backbone claims
SD = register_backbone(
    Backbone(
        name="sd",
        build=build_sd,
        required=SUBFOLDERS,
        cache_options=BUILTIN_CACHE_OPTIONS,
    )
)
load_sd_adapter = backbone_loader(SD)
