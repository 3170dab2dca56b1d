"""What every diffusion trainer does with its model: load the backbone adapter, place the frozen encoders, make the
denoiser trainable (LoRA adapters or full fine-tune), set up the reference, and save the result the way diffusers
loads it back."""

from __future__ import annotations

import copy
import logging
from typing import Any

import diffusers
import torch

from diffalign.config import REFERENCE_MODES
from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.loading import adapter_from_config
from diffalign.models.lora import DEFAULT_TARGET_MODULES, add_lora, save_lora
from diffalign.trainers.reference_store import offloaded_frozen_copy

logger = logging.getLogger(__name__)


class DiffusionPolicyMixin:
    """Mixed into a :class:`~diffalign.trainers.base.Trainer`; sets ``self.adapter`` and ``self.model``."""

    def build_policy(self, *, needs_reference: bool) -> DiffusionAdapter:
        mc, tc = self.config.model, self.config.train
        device = self.accelerator.device
        adapter = adapter_from_config(mc)
        for frozen in adapter.frozen_modules():
            frozen.requires_grad_(False).to(device)
            if self.weight_dtype != torch.float32:
                frozen.to(dtype=self.weight_dtype)
        denoiser = adapter.denoiser
        if self.config.lora.enabled:
            denoiser.requires_grad_(False)
            denoiser.to(device)
            if self.weight_dtype != torch.float32:
                denoiser.to(dtype=self.weight_dtype)
            add_lora(
                denoiser,
                rank=self.config.lora.rank,
                alpha=self.config.lora.alpha,
                target_modules=tuple(self.config.lora.target_modules or DEFAULT_TARGET_MODULES),
                init=self.config.lora.init,
            )
            for p in denoiser.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            if needs_reference and tc.reference == "frozen_copy":
                raise ValueError("train.reference: 'frozen_copy' is for full fine-tuning; LoRA uses adapters disabled")
        else:
            if needs_reference:  # before .to(device): an offloaded copy is made on the CPU and stays there
                self._set_up_full_ft_reference(adapter, denoiser)
            denoiser.to(device)
            denoiser.requires_grad_(True)
        if tc.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.adapter = adapter
        self.model = denoiser
        return adapter

    def _set_up_full_ft_reference(self, adapter: Any, denoiser: torch.nn.Module) -> None:
        """Full fine-tuning: a frozen copy on the device (``auto``, ``frozen_copy``), a frozen copy kept on the CPU and
        streamed per forward (``frozen_copy_offload``), or no second network (``precomputed``: the values come from a
        :class:`~diffalign.trainers.reference_store.ReferenceLogpStore`)."""
        mode = self.config.train.reference
        device = self.accelerator.device
        if mode in ("auto", "frozen_copy"):
            adapter.reference_denoiser = copy.deepcopy(denoiser).requires_grad_(False).to(device, self.weight_dtype)
        elif mode == "frozen_copy_offload":
            adapter.reference_denoiser = offloaded_frozen_copy(denoiser, device, self.weight_dtype)
        elif mode == "precomputed":
            adapter.reference_denoiser = None
        else:
            raise ValueError(f"train.reference: {mode!r} is not one of {REFERENCE_MODES}")

    def save_final(self) -> None:
        denoiser = self.accelerator.unwrap_model(self.model)
        subfolder = self.adapter.denoiser_subfolder
        if self.config.lora.enabled:
            pipeline_cls = getattr(diffusers, self.adapter.pipeline_class_name)
            save_lora(denoiser, self.output_dir, pipeline_cls=pipeline_cls, component=subfolder)
        else:
            denoiser.save_pretrained(self.output_dir / subfolder)
        logger.info("final weights written to %s", self.output_dir)
