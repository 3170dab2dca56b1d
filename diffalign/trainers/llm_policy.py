"""What the causal-LM trainers share: the policy (LoRA through peft, or every weight), its reference
(:func:`~diffalign.trainers.reference.build_reference`), the final save."""

from __future__ import annotations

import logging

import torch

from diffalign.config import Config
from diffalign.models.causal_lm import disable_dropout, load_causal_lm
from diffalign.models.reference import unwrap
from diffalign.trainers.base import Trainer
from diffalign.trainers.reference import ReferenceModel, build_reference
from diffalign.trainers.sharding import export_pretrained

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
    ``self.reference`` (a :class:`~diffalign.trainers.reference.ReferenceModel` of ``train.reference``, or ``None``
    when the objective has none)."""

    reference: ReferenceModel | None

    def build_policy(self, needs_reference: bool, stored_reference: bool = True) -> None:
        """Load the model; LoRA: adapters on a frozen base; full fine-tune: every weight trains. The reference is
        built while the model is still on the CPU (an offloaded copy never occupies the device);
        ``stored_reference=False`` for trainers whose reference runs on fresh rollouts (``precomputed`` is then
        refused)."""
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
        if self.config.lora.enabled:
            model = lora_model(model, self.config)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            model.requires_grad_(True)
        self.reference = None
        if needs_reference:
            self.reference = build_reference(
                tc.reference, model, lora=self.config.lora.enabled, device=device, stored_values=stored_reference
            )
        model.to(device)
        self.model, self.tokenizer = model, tokenizer

    def save_final(self) -> None:
        """``save_pretrained`` of the model (a peft adapter folder under LoRA) and the tokenizer; under FSDP2 every
        rank gathers the weights and the main one writes them."""
        if self.fsdp2 is not None:
            if export_pretrained(self.model, self.output_dir) is None:
                return
        else:
            unwrap(self.model).save_pretrained(self.output_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(self.output_dir)
        logger.info("final weights written to %s", self.output_dir)
