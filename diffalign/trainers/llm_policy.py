"""What the causal-LM trainers share: the policy (LoRA through peft, or every weight), its reference, the final save."""

from __future__ import annotations

import copy
import logging

import torch

from diffalign.config import Config
from diffalign.models.causal_lm import CausalLMAdapter, disable_dropout, load_causal_lm
from diffalign.models.reference import unwrap
from diffalign.trainers.base import Trainer
from diffalign.trainers.reference_store import offloaded_frozen_copy

logger = logging.getLogger(__name__)


def lora_model(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """``model`` with peft LoRA adapters (base weights frozen); ``lora.target_modules`` null = ``"all-linear"``."""
    from peft import LoraConfig, get_peft_model

    lc = config.lora
    peft_config = LoraConfig(
        r=lc.rank,
        lora_alpha=lc.alpha if lc.alpha is not None else lc.rank,
        target_modules=list(lc.target_modules) if lc.target_modules else "all-linear",
        lora_dropout=0.0,
        init_lora_weights=True if lc.init == "default" else lc.init,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


class CausalLMTrainer(Trainer):
    """Base of the causal-LM trainers: :meth:`build_policy` sets ``self.model``, ``self.tokenizer`` and
    ``self.adapter`` (a :class:`CausalLMAdapter` whose reference follows ``train.reference``)."""

    def build_policy(self, needs_reference: bool) -> None:
        """Load the model; LoRA: adapters on a frozen base (the reference is the base, adapters disabled); full
        fine-tune: every weight trains, the reference is a frozen copy (``auto`` / ``frozen_copy``), a CPU-held
        copy (``frozen_copy_offload``) or nothing (``precomputed``: the subclass supplies stored values)."""
        mc, tc = self.config.model, self.config.train
        device = self.accelerator.device
        model, tokenizer = load_causal_lm(
            mc.pretrained,
            revision=mc.revision,
            torch_dtype=mc.torch_dtype,
            trust_remote_code=mc.trust_remote_code,
            local_files_only=mc.local_files_only,
        )
        disable_dropout(model)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference_model = None
        if self.config.lora.enabled:
            model = lora_model(model, self.config)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            model.requires_grad_(True)
            if needs_reference and tc.reference in ("auto", "frozen_copy"):
                reference_model = copy.deepcopy(model).requires_grad_(False).eval().to(device)
            elif needs_reference and tc.reference == "frozen_copy_offload":
                reference_model = offloaded_frozen_copy(model, device, model.dtype)
        model.to(device)
        self.model, self.tokenizer = model, tokenizer
        self.adapter = CausalLMAdapter(model, reference_model=reference_model)

    def after_prepare(self) -> None:
        self.adapter.model = self.model

    def save_final(self) -> None:
        """``save_pretrained`` of the model (a peft adapter folder under LoRA) and the tokenizer."""
        unwrap(self.model).save_pretrained(self.output_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(self.output_dir)
        logger.info("final weights written to %s", self.output_dir)
