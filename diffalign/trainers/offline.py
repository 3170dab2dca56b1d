"""Offline preference training on fixed image pairs: Diffusion-DPO (and its IPO / hinge / robust / Poly-DPO
variants), DCPO (each image under its own caption, for policy and reference) and MaPO (reference-free).
:class:`OfflineDiffusionTrainer` is what every trainer on such a table shares (the loss, the policy, the pair data,
its features and draws); the SFT baseline on winners (:mod:`diffalign.trainers.sft`) and SOAR build on it too.

Per micro-batch: winners and losers share noise and timestep (drawn from (seed, epoch, pair index)) and go through
one denoiser forward of 2B. The reference's values of the same inputs come from ``self.reference``
(:mod:`diffalign.trainers.reference`: LoRA adapters disabled, a frozen or offloaded copy, or values stored by one
pass before training that every process shares out, :meth:`OfflinePreferenceTrainer.reference_pass_batch`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable
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
from diffalign.models.backbones import backbone_for
from diffalign.models.diffusion import DiffusionAdapter
from diffalign.trainers.base import Trainer, TrainResult
from diffalign.trainers.diffusion_policy import DiffusionPolicyMixin, timestep_weighted
from diffalign.trainers.reference import PrecomputedReference
from diffalign.trainers.reference_store import (
    ProcessGroup,
    ReferenceLogpStore,
    plan_micro_batches,
    precompute_reference_logps,
    reference_key,
    weights_fingerprint,
)

logger = logging.getLogger(__name__)


ENCODER_SUBFOLDERS = (
    "vae",
    *(f"{kind}{suffix}" for suffix in ("", "_2", "_3") for kind in ("text_encoder", "tokenizer")),
)


def model_fingerprint(
    pretrained: str, revision: str | None, variant: str | None, vae: str | None = None, extra: str = ""
) -> str:
    """Identity of the frozen encoders (VAE, text encoders) and of what shapes their outputs (``extra``: e.g. SD3's
    T5 choice and token length) for the latent / text-embedding cache key."""
    parts = [pretrained, str(revision), str(variant), str(vae), extra]
    root = Path(pretrained)
    if root.is_dir():
        for sub in ENCODER_SUBFOLDERS:
            for f in sorted((root / sub).glob("*")) if (root / sub).is_dir() else []:
                stat = f.stat()
                parts.append(f"{sub}/{f.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


#: The arguments of ``DiffusionAdapter.pair_logps`` for one micro-batch: (x0 chosen, x0 rejected, cond chosen,
#: cond rejected, noise, timesteps).
PairInputs = tuple[torch.Tensor, torch.Tensor, dict, dict, torch.Tensor, torch.Tensor]


class OfflineDiffusionTrainer(DiffusionPolicyMixin, Trainer):
    """A diffusion model trained on a table of pairs: ``loss.name``'s loss and its parameters, the policy (and the
    reference the loss needs), the pair dataset (optionally a latent cache), and each batch's features and draws.
    Subclasses supply ``compute_loss``."""

    def build(self) -> None:
        self._build_loss()
        adapter = self.build_policy(needs_reference=getattr(self.loss_fn, "needs_reference", False))
        self._build_data(adapter)

    def _build_loss(self) -> None:
        """``self.loss_fn`` and ``self.loss_params`` (``loss.beta`` and ``loss.params``, those the loss accepts)."""
        lc = self.config.loss
        self.loss_fn = get_loss(lc.name)
        accepted = inspect.signature(self.loss_fn).parameters
        self.loss_params = {k: v for k, v in {"beta": lc.beta, **lc.params}.items() if k in accepted}
        unknown = set(lc.params) - set(accepted)
        if unknown:
            raise ValueError(f"loss.params: {sorted(unknown)} are not parameters of loss '{lc.name}'")

    def _build_data(self, adapter: DiffusionAdapter) -> None:
        """``self.dataset`` (the pair table; the latent cache when ``data.cache_dir`` is set) and its collate."""
        mc, dc, tc = self.config.model, self.config.data, self.config.train
        table = load_preference_table(
            dc.path,
            split=dc.split,
            keep_ties=dc.keep_ties,
            on_bad_row=dc.on_bad_row,
            caption_column=dc.caption_column,
            dual_captions=dc.dual_captions,
            max_samples=dc.max_samples,
            verify_images=dc.cache_dir is None,  # with a cache, images are read only if it must be (re)built
        )
        dataset = PreferencePairDataset(
            table,
            resolution=dc.resolution,
            random_crop=dc.random_crop,
            hflip=dc.hflip,
            proportion_empty_prompts=dc.proportion_empty_prompts,
            seed=tc.seed,
            joint=getattr(adapter, "time_id_convention", None) == "from_data",
        )
        self.cached = dc.cache_dir is not None
        if self.cached:
            with self.accelerator.main_process_first():
                dataset = build_preference_cache(
                    dataset,
                    encode_images=self._encode_images,
                    encode_prompts=adapter.encode_prompts,
                    model_fingerprint=model_fingerprint(
                        mc.pretrained,
                        mc.revision,
                        mc.variant,
                        mc.vae,
                        backbone_for(adapter).cache_fingerprint(mc),
                    ),
                    cache_root=dc.cache_dir,
                    show_progress=self.accelerator.is_local_main_process,
                )
        self.dataset = dataset
        self.collate = collate_preference_batch

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = self.adapter.vae.dtype if self.adapter.vae is not None else torch.float32
        return self.adapter.encode_images(pixels.to(self.accelerator.device, dtype=vae_dtype)).float()

    def _features(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        device = self.accelerator.device
        if self.cached:
            cond_c = {k: v.to(device) for k, v in batch["cond_chosen"].items()}
            cond_r = {k: v.to(device) for k, v in batch["cond_rejected"].items()}
            cond_c, cond_r = self._with_batch_conditioning(batch, cond_c, cond_r)
            return batch["latents_chosen"].to(device), batch["latents_rejected"].to(device), cond_c, cond_r
        with torch.no_grad():
            x0_c = self._encode_images(batch["pixels_chosen"])
            x0_r = self._encode_images(batch["pixels_rejected"])
            cond_c = self.adapter.encode_prompts(batch["prompt_chosen"])
            if batch["prompt_rejected"] == batch["prompt_chosen"]:
                cond_r = cond_c
            else:
                cond_r = self.adapter.encode_prompts(batch["prompt_rejected"])
        cond_c, cond_r = self._with_batch_conditioning(batch, cond_c, cond_r)
        return x0_c, x0_r, cond_c, cond_r

    def _with_batch_conditioning(self, batch: dict[str, Any], cond_c: dict, cond_r: dict) -> tuple[dict, dict]:
        """Add the pair's data-derived conditioning (SDXL time ids), the same for winner and loser."""
        extra = self.adapter.batch_conditioning(batch, self.config.data.resolution)
        if not extra:
            return cond_c, cond_r
        extra = {k: v.to(self.accelerator.device) for k, v in extra.items()}
        return {**cond_c, **extra}, {**cond_r, **extra}

    def _draws(self, batch: dict[str, Any], epoch: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (timesteps, noise) of ``batch``, addressed by (seed, epoch, sample index): the same on any number of
        processes, after a resume, and for every method that trains on the same rows."""
        adapter, device, seed, indices = self.adapter, self.accelerator.device, self.config.train.seed, batch["index"]
        timesteps = adapter.sample_timesteps(seed, epoch, indices.tolist()).to(device)
        noise = adapter.sample_noise(tuple(x0.shape[1:]), seed, epoch, indices.tolist()).to(device, dtype=x0.dtype)
        return timesteps, noise


class OfflinePreferenceTrainer(OfflineDiffusionTrainer):
    """Offline preference training of a diffusion model on a table of pairs (see the module docstring); SAIL's DPO
    rounds train through it too."""

    reference_store: ReferenceLogpStore | None = None

    def _build_loss(self) -> None:
        super()._build_loss()
        if getattr(self.loss_fn, "kind", None) == "chosen_only":
            raise ValueError(
                f"loss.name '{self.config.loss.name}' scores the chosen image only and OfflinePreferenceTrainer trains "
                "on pairs: start the run with diffalign.trainers.run.train, which picks train.method's trainer"
            )

    def after_prepare(self) -> None:
        super().after_prepare()
        if isinstance(self.reference, PrecomputedReference):
            self._fill_reference_store()  # here: before a checkpoint is restored, the weights are the initial ones

    def _pair_inputs(self, batch: dict[str, Any], epoch: int) -> PairInputs:
        x0_c, x0_r, cond_c, cond_r = self._features(batch)
        timesteps, noise = self._draws(batch, epoch, x0_c)
        return x0_c, x0_r, cond_c, cond_r, noise, timesteps

    def _reference_forward(self, inputs: PairInputs) -> Callable[[torch.nn.Module], tuple[torch.Tensor, torch.Tensor]]:
        """How the reference network evaluates a micro-batch: (chosen, rejected) surrogates, unweighted, (B,) each."""
        return lambda module: self.adapter.with_denoiser(module).pair_logps(*inputs)

    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        adapter = self.adapter
        inputs = self._pair_inputs(batch, epoch)
        timesteps = inputs[-1]
        metrics: dict[str, torch.Tensor] = {}
        with self.accelerator.autocast():
            weights = self.timestep_weights(timesteps)
            logp_c, logp_r = adapter.pair_logps(*inputs)
            metrics["mse_policy_chosen"] = -2 * logp_c.detach()
            metrics["mse_policy_rejected"] = -2 * logp_r.detach()
            logps = {
                "policy_chosen_logps": timestep_weighted(logp_c, weights),
                "policy_rejected_logps": timestep_weighted(logp_r, weights),
            }
            if self.reference is not None:
                ref_c, ref_r = self.reference.logps(batch, epoch, self._reference_forward(inputs))
                metrics["mse_reference_chosen"] = -2 * ref_c
                metrics["mse_reference_rejected"] = -2 * ref_r
                logps.update(
                    reference_chosen_logps=timestep_weighted(ref_c, weights),
                    reference_rejected_logps=timestep_weighted(ref_r, weights),
                )
            out = self.loss_fn(**logps, **self.loss_params)
        if out.logits is not None:
            # TRL's names; ties count one half, so the accuracy reads 0.5 at initialisation (diffusers' convention)
            metrics["rewards/accuracies"] = (out.logits > 0).float() + 0.5 * (out.logits == 0).float()
        if out.chosen_rewards is not None and out.rejected_rewards is not None:
            metrics["rewards/chosen"] = out.chosen_rewards
            metrics["rewards/rejected"] = out.rejected_rewards
            metrics["rewards/margins"] = out.chosen_rewards - out.rejected_rewards
        for name, value in out.metrics.items():
            metrics[name] = value
        return out.losses.mean(), metrics

    def _reference_key_parts(self) -> dict[str, Any]:
        """Everything the stored reference values depend on (hashed into the store's folder name)."""
        mc, dc, tc, lora = self.config.model, self.config.data, self.config.train, self.config.lora
        data_fingerprint = getattr(self.dataset, "fingerprint", None)
        if data_fingerprint is None:  # a CachedPreferenceDataset records its source's fingerprint in the manifest
            data_fingerprint = self.dataset.manifest["data_fingerprint"]
        return {
            "weights": weights_fingerprint(mc.pretrained, mc.revision, mc.variant),
            "vae_weights": weights_fingerprint(mc.vae) if getattr(mc, "vae", None) else None,  # a separate VAE
            "model": {k: v for k, v in vars(mc).items() if k != "local_files_only"},
            "backbone": type(self.adapter).__name__,
            "prediction_type": self.adapter.prediction_type,
            "data": data_fingerprint,
            "cached": self.cached,
            "resolution": dc.resolution,
            "hflip": dc.hflip,
            "random_crop": dc.random_crop,
            "proportion_empty_prompts": dc.proportion_empty_prompts,
            "seed": tc.seed,
            "method": tc.method,
            "mixed_precision": self.accelerator.mixed_precision,
            # LoRA: the reference is the base with adapters disabled (its weights may differ from the pretrained
            # ones for inits that rewrite them); full fine-tune: the initial weights
            "source": (
                ["lora_disabled", lora.init, lora.rank, list(self.lora_targets(self.adapter))]
                if lora.enabled
                else "initial"
            ),
        }

    def _fill_reference_store(self) -> None:
        """``train.reference=precomputed``: open the store, let every process compute its share of the planned
        micro-batches the store lacks (:meth:`reference_pass_batch`; process 0 writes), then read training's values
        from it."""
        tc, acc = self.config.train, self.accelerator
        parts = self._reference_key_parts()
        root = Path(self.dataset.folder) / "reference" if self.cached else self.output_dir / "reference_logps"
        plan = plan_micro_batches(
            len(self.dataset),
            tc.train_batch_size,
            num_processes=acc.num_processes,
            seed=tc.seed,
            num_micro_batches=tc.max_steps * tc.gradient_accumulation_steps,
        )
        with acc.main_process_first():  # the main process writes the manifest
            store = ReferenceLogpStore(root / reference_key(parts), len(self.dataset), parts)
        computed = precompute_reference_logps(
            store,
            plan,
            self.reference_pass_batch,
            processes=ProcessGroup.of(acc),
            show_progress=tc.progress_bar and acc.is_local_main_process,
        )
        logger.info(
            "reference log-likelihoods: %s (%d micro-batches computed now, %d planned)",
            store.folder,
            computed,
            len(plan) // acc.num_processes,
        )
        device = acc.device

        def lookup(batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
            chosen, rejected = store.get(epoch, batch["index"].tolist())
            return chosen.to(device), rejected.to(device)

        self.reference.load(lookup, str(store.folder))
        self.reference_store = store

    def reference_pass_batch(self, epoch: int, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored reference values of one planned local micro-batch: the batch training will draw, and the live
        reference's inputs and forward (:meth:`_reference_forward`) on the initial network; (B,) float32 each."""
        self.dataset.set_epoch(epoch)
        batch = self.collate([self.dataset[i] for i in indices])
        with self.accelerator.autocast():
            return self.reference.compute(self._reference_forward(self._pair_inputs(batch, epoch)))


def train(config: Config) -> TrainResult:
    """Run the offline preference trainer described by ``config`` (the entry point of ``scripts/train.py``)."""
    return OfflinePreferenceTrainer(config).train()
