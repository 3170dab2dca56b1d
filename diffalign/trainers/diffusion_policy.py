"""What every diffusion trainer does with its model: load the backbone adapter, place the frozen encoders, make the
denoiser trainable (LoRA adapters or full fine-tune), build its reference (:func:`~diffalign.trainers.reference.
build_reference`), weigh per-sample terms by timestep, and save the result the way diffusers loads it back."""

from __future__ import annotations

import logging

import diffusers
import torch

from diffalign.models.backbones import backbone_for
from diffalign.models.components import ModelNotFoundError
from diffalign.models.diffusion import DiffusionAdapter, unwrap
from diffalign.models.export import pipeline_base, write_pipeline_folder
from diffalign.models.loading import adapter_from_config
from diffalign.models.lora import add_lora, save_lora
from diffalign.trainers.reference import ReferenceModel, build_reference
from diffalign.trainers.sharding import export_denoiser, export_lora
from diffalign.utils.modules import move_module

logger = logging.getLogger(__name__)


def timestep_weighted(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """ω(t)·values: a per-sample timestep weight on a log-likelihood surrogate (or an MSE), shared by the pair and by
    policy and reference; ``None`` is the constant weighting."""
    return values if weights is None else values * weights


class DiffusionPolicyMixin:
    """Mixed into a :class:`~diffalign.trainers.base.Trainer`; sets ``self.adapter``, ``self.model`` (the trained
    denoiser) and ``self.reference`` (a :class:`~diffalign.trainers.reference.ReferenceModel`, or ``None`` when the
    objective has no reference)."""

    reference: ReferenceModel | None

    def build_policy(self, *, needs_reference: bool, stored_reference: bool = True) -> DiffusionAdapter:
        """Load the adapter and make its denoiser the policy; ``stored_reference=False`` for trainers whose reference
        runs on inputs no pass can store in advance (``train.reference=precomputed`` is then refused)."""
        mc, tc = self.config.model, self.config.train
        device = self.accelerator.device
        adapter = adapter_from_config(mc)
        cast = None if self.weight_dtype == torch.float32 else self.weight_dtype  # float32 keeps the loaded dtypes
        for frozen in adapter.frozen_modules():
            move_module(frozen.requires_grad_(False), device, cast)
        if mc.vae_channels_last and _is_2d(adapter.vae):
            adapter.vae.to(memory_format=torch.channels_last)  # its convolutions run ~20 % faster in NHWC
        denoiser = adapter.denoiser
        if self.config.lora.enabled:
            denoiser.requires_grad_(False)
            move_module(denoiser, device, cast)
            add_lora(
                denoiser,
                rank=self.config.lora.rank,
                alpha=self.config.lora.alpha,
                target_modules=self.lora_targets(adapter),
                init=self.config.lora.init,
                exclude_modules=adapter.unused_modules(),
            )
            for p in denoiser.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            denoiser.requires_grad_(True)
            unused = set(adapter.unused_modules())
            for name, module in unwrap(denoiser).named_modules():
                if name in unused:
                    module.requires_grad_(False)  # no gradient ever reaches it
        self.reference = None
        if needs_reference:  # full fine-tune: still on the CPU, so that an offloaded copy never occupies the device
            self.reference = build_reference(
                tc.reference,
                denoiser,
                lora=self.config.lora.enabled,
                device=device,
                dtype=self.weight_dtype,
                stored_values=stored_reference,
            )
        denoiser.to(device)
        if tc.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.adapter = adapter
        self.model = denoiser
        return adapter

    def lora_targets(self, adapter: DiffusionAdapter) -> tuple[str, ...]:
        """``lora.target_modules``, or when it is null the default LoRA targets of ``adapter``'s backbone."""
        return tuple(self.config.lora.target_modules or backbone_for(adapter).lora_targets)

    def after_prepare(self) -> None:
        """The adapter runs the prepared policy (e.g. DDP-wrapped: its forward is what synchronises gradients)."""
        self.adapter.denoiser = self.model

    def timestep_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """ω(t) of ``loss.weighting`` per sample, (N,); ``None`` for the constant weighting."""
        lc = self.config.loss
        if lc.weighting == "constant":
            return None
        return self.adapter.snr_weights(timesteps, lc.snr_gamma, lc.weighting)

    def save_final(self) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``). Full fine-tune: the denoiser's
        folder (``unet/`` or ``transformer/``, the EMA weights under ``train.ema``), completed into a pipeline folder
        that ``<Pipeline>.from_pretrained(output_dir)`` loads (:meth:`export_pipeline`). Under FSDP2 every rank
        gathers, the main one writes."""
        subfolder = self.adapter.denoiser_subfolder
        pipeline_cls = getattr(diffusers, self.adapter.pipeline_class_name)
        if self.fsdp2 is not None:
            if self.config.lora.enabled:
                export_lora(self.model, self.output_dir, pipeline_cls=pipeline_cls, component=subfolder)
            else:
                export_denoiser(self.model, self.output_dir / subfolder)
        elif self.config.lora.enabled:
            save_lora(
                self.accelerator.unwrap_model(self.model),
                self.output_dir,
                pipeline_cls=pipeline_cls,
                component=subfolder,
            )
        else:
            self.accelerator.unwrap_model(self.model).save_pretrained(self.output_dir / subfolder)
        if not self.config.lora.enabled and self.accelerator.is_main_process:
            self.export_pipeline()
        logger.info("final weights written to %s", self.output_dir)

    def export_pipeline(self) -> None:
        """Place the base pipeline's ``model_index.json`` and other components beside the saved denoiser
        (:func:`~diffalign.models.export.write_pipeline_folder`). A base that cannot provide them (no index, a
        component missing, a hub snapshot out of reach) leaves the denoiser folder alone, with a warning."""
        subfolder = self.adapter.denoiser_subfolder
        try:
            placed = write_pipeline_folder(pipeline_base(self.config.model), self.output_dir, subfolder)
        except ModelNotFoundError as err:
            logger.warning(
                "no pipeline folder written: %s; %s holds the trained %s/ only (from_pretrained(..., subfolder=%r))",
                err,
                self.output_dir,
                subfolder,
                subfolder,
            )
            return
        logger.info(
            "pipeline folder %s: %s/ trained, %s from the base",
            self.output_dir,
            subfolder,
            ", ".join(f"{name}/ ({how})" for name, how in placed.items()),
        )


def _is_2d(vae: torch.nn.Module | None) -> bool:
    """Whether ``vae`` is an image VAE whose convolutions take the NHWC layout (not Qwen-Image's 3-D video VAE,
    whose 5-D weights have no channels_last)."""
    return vae is not None and all(p.ndim != 5 for p in vae.parameters())
