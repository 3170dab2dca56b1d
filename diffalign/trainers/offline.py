"""Offline preference training on fixed image pairs: Diffusion-DPO (and its IPO / hinge / robust / Poly-DPO
variants), DCPO (each image under its own caption, for policy and reference), MaPO (reference-free) and the SFT
baseline on winners.

Per micro-batch: winners and losers share noise and timestep (drawn from (seed, epoch, pair index)) and go through
one denoiser forward of 2B; the reference pass runs without grad, with LoRA adapters disabled or on a frozen copy.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from diffalign.config import Config
from diffalign.data import (
    PreferencePairDataset,
    build_preference_cache,
    collate_preference_batch,
    load_preference_table,
)
from diffalign.losses import get_loss
from diffalign.models.loading import load_sd_adapter
from diffalign.models.lora import add_lora, save_lora
from diffalign.trainers.base import Trainer, TrainResult

logger = logging.getLogger(__name__)


def model_fingerprint(pretrained: str, revision: str | None, variant: str | None) -> str:
    """Identity of the frozen encoders (VAE, text encoder) for the latent / text-embedding cache key."""
    parts = [pretrained, str(revision), str(variant)]
    root = Path(pretrained)
    if root.is_dir():
        for sub in ("vae", "text_encoder", "tokenizer"):
            for f in sorted((root / sub).glob("*")) if (root / sub).is_dir() else []:
                stat = f.stat()
                parts.append(f"{sub}/{f.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class OfflinePreferenceTrainer(Trainer):
    def build(self) -> None:
        mc, dc, lc, tc = self.config.model, self.config.data, self.config.loss, self.config.train
        device = self.accelerator.device
        adapter = load_sd_adapter(
            mc.pretrained,
            revision=mc.revision,
            variant=mc.variant,
            local_files_only=mc.local_files_only,
            prediction_type=mc.prediction_type,
        )
        for frozen in (adapter.vae, adapter.text_encoder):
            if frozen is not None:
                frozen.requires_grad_(False).to(device)
                if self.weight_dtype != torch.float32:
                    frozen.to(dtype=self.weight_dtype)
        unet = adapter.denoiser
        self.loss_fn = get_loss(lc.name)
        accepted = inspect.signature(self.loss_fn).parameters
        self.loss_params = {k: v for k, v in {"beta": lc.beta, **lc.params}.items() if k in accepted}
        unknown = set(lc.params) - set(accepted)
        if unknown:
            raise ValueError(f"loss.params: {sorted(unknown)} are not parameters of loss '{lc.name}'")

        needs_reference = getattr(self.loss_fn, "needs_reference", False)
        if self.config.lora.enabled:
            unet.requires_grad_(False)
            unet.to(device)
            if self.weight_dtype != torch.float32:
                unet.to(dtype=self.weight_dtype)
            add_lora(
                unet,
                rank=self.config.lora.rank,
                alpha=self.config.lora.alpha,
                target_modules=tuple(self.config.lora.target_modules),
                init=self.config.lora.init,
            )
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            if needs_reference and tc.reference == "frozen_copy":
                raise ValueError("train.reference: 'frozen_copy' is for full fine-tuning; LoRA uses adapters disabled")
        else:
            unet.to(device)
            unet.requires_grad_(True)
            if needs_reference:
                adapter.reference_denoiser = copy.deepcopy(unet).requires_grad_(False).to(dtype=self.weight_dtype)
        if tc.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.adapter = adapter
        self.model = unet

        table = load_preference_table(
            dc.path,
            split=dc.split,
            keep_ties=dc.keep_ties,
            on_bad_row=dc.on_bad_row,
            caption_column=dc.caption_column,
            dual_captions=dc.dual_captions,
            max_samples=dc.max_samples,
        )
        dataset = PreferencePairDataset(
            table,
            resolution=dc.resolution,
            random_crop=dc.random_crop,
            hflip=dc.hflip,
            proportion_empty_prompts=dc.proportion_empty_prompts,
            seed=tc.seed,
        )
        self.cached = dc.cache_dir is not None
        if self.cached:
            with self.accelerator.main_process_first():
                dataset = build_preference_cache(
                    dataset,
                    encode_images=self._encode_images,
                    encode_prompts=adapter.encode_prompts,
                    model_fingerprint=model_fingerprint(mc.pretrained, mc.revision, mc.variant),
                    cache_root=dc.cache_dir,
                    show_progress=self.accelerator.is_local_main_process,
                )
        self.dataset = dataset
        self.collate = collate_preference_batch

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = self.adapter.vae.dtype if self.adapter.vae is not None else torch.float32
        return self.adapter.encode_images(pixels.to(self.accelerator.device, dtype=vae_dtype)).float()

    def after_prepare(self) -> None:
        self.adapter.denoiser = self.model

    def _features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        device = self.accelerator.device
        if self.cached:
            cond_c = {k: v.to(device) for k, v in batch["cond_chosen"].items()}
            cond_r = {k: v.to(device) for k, v in batch["cond_rejected"].items()}
            return batch["latents_chosen"].to(device), batch["latents_rejected"].to(device), cond_c, cond_r
        with torch.no_grad():
            x0_c = self._encode_images(batch["pixels_chosen"])
            x0_r = self._encode_images(batch["pixels_rejected"])
            cond_c = self.adapter.encode_prompts(batch["prompt_chosen"])
            if batch["prompt_rejected"] == batch["prompt_chosen"]:
                cond_r = cond_c
            else:
                cond_r = self.adapter.encode_prompts(batch["prompt_rejected"])
        return x0_c, x0_r, cond_c, cond_r

    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        adapter, device, seed = self.adapter, self.accelerator.device, self.config.train.seed
        x0_c, x0_r, cond_c, cond_r = self._features(batch)
        indices = batch["index"].tolist()
        timesteps = adapter.sample_timesteps(seed, epoch, indices).to(device)
        noise = adapter.sample_noise(tuple(x0_c.shape[1:]), seed, epoch, indices).to(device, dtype=x0_c.dtype)
        metrics: dict[str, torch.Tensor] = {}
        with self.accelerator.autocast():
            lc = self.config.loss
            weights = None if lc.weighting == "constant" else adapter.snr_weights(timesteps, lc.snr_gamma, lc.weighting)
            if self.config.train.method == "sft":
                logp_c = adapter.denoising_logp(x0_c, noise, timesteps, cond_c)
                metrics["mse_policy_chosen"] = -2 * logp_c.detach()
                out = self.loss_fn(policy_chosen_logps=_weighted(logp_c, weights))
                return out.losses.mean(), metrics
            logp_c, logp_r = adapter.pair_logps(x0_c, x0_r, cond_c, cond_r, noise, timesteps)
            metrics["mse_policy_chosen"] = -2 * logp_c.detach()
            metrics["mse_policy_rejected"] = -2 * logp_r.detach()
            logps = {
                "policy_chosen_logps": _weighted(logp_c, weights),
                "policy_rejected_logps": _weighted(logp_r, weights),
            }
            if self.loss_fn.needs_reference:
                with torch.no_grad():
                    ref_c, ref_r = adapter.pair_logps(x0_c, x0_r, cond_c, cond_r, noise, timesteps, reference=True)
                metrics["mse_reference_chosen"] = -2 * ref_c
                metrics["mse_reference_rejected"] = -2 * ref_r
                logps.update(
                    reference_chosen_logps=_weighted(ref_c, weights), reference_rejected_logps=_weighted(ref_r, weights)
                )
            out = self.loss_fn(**logps, **self.loss_params)
        if out.logits is not None:
            # ties count one half, so the metric reads 0.5 at initialisation (diffusers' convention)
            metrics["implicit_acc"] = (out.logits > 0).float() + 0.5 * (out.logits == 0).float()
        if out.chosen_rewards is not None and out.rejected_rewards is not None:
            metrics["rewards_chosen"] = out.chosen_rewards
            metrics["rewards_rejected"] = out.rejected_rewards
            metrics["reward_margin"] = out.chosen_rewards - out.rejected_rewards
        for name, value in out.metrics.items():
            metrics[name] = value
        return out.losses.mean(), metrics

    def save_final(self) -> None:
        unet = self.accelerator.unwrap_model(self.model)
        if self.config.lora.enabled:
            save_lora(unet, self.output_dir)
        else:
            unet.save_pretrained(self.output_dir / "unet")
        logger.info("final weights written to %s", self.output_dir)


def _weighted(logps: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """ω(t)·logp: a per-sample timestep weight on the MSE, shared by the pair and by policy and reference."""
    return logps if weights is None else logps * weights


def train(config: Config) -> TrainResult:
    """Run the offline preference trainer described by ``config`` (the entry point of ``scripts/train.py``)."""
    return OfflinePreferenceTrainer(config).train()
