"""SDXL adapter: the SD noising and targets, with SDXL's two text encoders and added time ids.

Conditioning (identical in the original Diffusion-DPO script, ``SalesforceAIResearch/DiffusionDPO`` ``train.py``, and
in diffusers' ``train_diffusion_dpo_sdxl.py``):

* ``encoder_hidden_states`` = ``hidden_states[-2]`` (penultimate layer) of ``text_encoder`` (CLIP-L) and of
  ``text_encoder_2`` (OpenCLIP-bigG), concatenated on the feature axis (768 + 1280 = 2048 for SDXL);
* ``text_embeds`` = ``text_encoder_2(...)[0]``, the projected pooled embedding of the second encoder;
* ``time_ids`` = ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, in one of two conventions:

  - ``"constant"`` (default): ``[R, R, 0, 0, R, R]`` for every sample, as the original Diffusion-DPO script, which
    trained the released DPO-SDXL checkpoint;
  - ``"from_data"``: ``jpg_0``'s size before resizing and the crop offset of the pair, as diffusers' SDXL DPO script
    and MaPO (the data must then use the joint pair transform, see :mod:`diffalign.data.transforms`).

Refiner-style aesthetic-score ids (``[R, R, 0, 0, 6.0]``) are not supported.

The module also holds the backbone's build function (SD's components, :func:`~diffalign.models.sd.sd_components`,
plus the second encoder and tokenizer), its registry entry (``sdxl``: a pipeline with a ``text_encoder_2`` and no more
specific backbone's component) and its public loader, :func:`load_sdxl_adapter`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from diffalign.models import sd  # its names are read at call time: backbones may import this module before sd's end
from diffalign.models.backbones import BUILTIN_CACHE_OPTIONS, Backbone, backbone_loader, register_backbone
from diffalign.models.components import Source
from diffalign.models.diffusion import SDAdapter, check_prompts, unwrap

TIME_ID_CONVENTIONS = ("constant", "from_data")
#: The subfolders an SDXL pipeline folder must have (a VAE is optional).
SUBFOLDERS = ("unet", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class SDXLAdapter(SDAdapter):
    """Stable Diffusion XL: ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` + two CLIP encoders.

    Noising, targets (epsilon / v-prediction), SNR weights and VAE encoding are SD's (:class:`SDAdapter`); only the
    text conditioning and the added ``time_ids`` differ. The keywords beyond SDXL's own (``vae``, ``text_encoder``,
    ``tokenizer``, ``prediction_type``) are :class:`SDAdapter`'s.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        *,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: Any | None = None,
        time_ids: str = "constant",
        **sd_parts: Any,
    ) -> None:
        super().__init__(unet, scheduler, **sd_parts)
        if time_ids not in TIME_ID_CONVENTIONS:
            raise ValueError(f"time_ids={time_ids!r}: expected one of {TIME_ID_CONVENTIONS}")
        if getattr(unwrap(unet).config, "addition_embed_type", None) != "text_time":
            raise ValueError(
                "SDXLAdapter needs a UNet with addition_embed_type='text_time' (an SDXL UNet); "
                f"got {getattr(unwrap(unet).config, 'addition_embed_type', None)!r}. Use SDAdapter for SD 1.x/2.x"
            )
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.time_id_convention = time_ids
        if text_encoder_2 is not None:
            text_encoder_2.requires_grad_(False)

    pipeline_class_name = "StableDiffusionXLPipeline"

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def tokenize_pair(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids of both tokenizers, each padded to its ``model_max_length`` and truncated."""
        if self.tokenizer is None or self.tokenizer_2 is None:
            raise RuntimeError("SDXLAdapter needs tokenizer and tokenizer_2 (load with load_adapter)")
        prompts = check_prompts(prompts)
        return tuple(  # type: ignore[return-value]
            tok(
                list(prompts),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tok in (self.tokenizer, self.tokenizer_2)
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (N, L, D1 + D2), "text_embeds": (N, P)}`` (see the module docstring)."""
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise RuntimeError("SDXLAdapter needs text_encoder and text_encoder_2 (load with load_adapter)")
        hidden, pooled = [], None
        for encoder, ids in zip((self.text_encoder, self.text_encoder_2), self.tokenize_pair(prompts), strict=True):
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            pooled = out[0]  # only the last encoder's counts: its projected pooled output
            hidden.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def batch_conditioning(self, batch: Mapping[str, Any], resolution: int) -> dict[str, Tensor]:
        """``{"time_ids": (B, 6)}`` for a data batch at ``resolution`` (see the module docstring), float32."""
        size = len(batch["index"])
        if self.time_id_convention == "constant":
            ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
            return {"time_ids": ids.expand(size, 6).clone()}
        for key in ("original_size", "crop_top_left"):
            if key not in batch:
                raise KeyError(f"time_ids='from_data' needs '{key}' in the batch (PreferencePairDataset provides it)")
        target = torch.tensor([resolution, resolution]).expand(size, 2)
        return {
            "time_ids": torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float(),
        }

    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        missing = {"encoder_hidden_states", "text_embeds", "time_ids"} - set(cond)
        if missing:
            raise KeyError(
                f"SDXL conditioning is missing {sorted(missing)} (got {sorted(cond)}); time_ids come from "
                "adapter.batch_conditioning(batch, resolution)"
            )
        param = next(unwrap(model).parameters())
        rows = x_t.shape[0]
        for key in ("encoder_hidden_states", "text_embeds", "time_ids"):
            if cond[key].shape[0] != rows:
                raise ValueError(f"{key} has {cond[key].shape[0]} rows but x_t has {rows}; one per sample")

        def cast(t: Tensor) -> Tensor:
            return t.to(device=param.device, dtype=param.dtype)

        return model(
            cast(x_t),
            timesteps.to(param.device),
            encoder_hidden_states=cast(cond["encoder_hidden_states"]),
            added_cond_kwargs={"text_embeds": cast(cond["text_embeds"]), "time_ids": cast(cond["time_ids"])},
            return_dict=False,
        )[0]


def build_sdxl(src: Source, *, prediction_type: str | None = None, time_ids: str = "constant") -> SDXLAdapter:
    """Load an SDXL pipeline's UNet, DDPM scheduler, both CLIP encoders and tokenizers (and VAE) into an
    :class:`SDXLAdapter`; ``time_ids`` is ``"constant"`` or ``"from_data"`` (see the module docstring)."""
    text_encoder_2 = src.transformers(CLIPTextModelWithProjection, "text_encoder_2").eval()
    return SDXLAdapter(
        **sd.sd_components(src),
        text_encoder_2=text_encoder_2,
        tokenizer_2=src.config_only(CLIPTokenizer, "tokenizer_2"),
        prediction_type=prediction_type,
        time_ids=time_ids,
    )


SDXL = register_backbone(
    Backbone(
        name="sdxl",
        build=build_sdxl,
        required=SUBFOLDERS,
        detect="text_encoder_2",
        priority=10,
        options={"prediction_type": "prediction_type", "sdxl_time_ids": "time_ids"},
        cache_options=BUILTIN_CACHE_OPTIONS,
    )
)
load_sdxl_adapter = backbone_loader(SDXL)
