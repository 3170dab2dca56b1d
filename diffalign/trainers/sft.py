"""The SFT baseline of the offline diffusion methods (train.method sft): the denoising loss on the preferred image of
each pair, ``−logp = ½·MSE`` per sample (loss ``sft``, :func:`diffalign.losses.reference_free.sft`), weighted by
``loss.weighting``. Data, features and draws are those of the preference trainers
(:class:`~diffalign.trainers.offline.OfflineDiffusionTrainer`): the same rows, noise and timesteps as a DPO run on the
same table and seed.
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.config import Config
from diffalign.trainers.base import TrainResult
from diffalign.trainers.diffusion_policy import timestep_weighted
from diffalign.trainers.offline import OfflineDiffusionTrainer


class SFTTrainer(OfflineDiffusionTrainer):
    """Supervised fine-tuning on the winners of a pair table; logs ``mse_policy_chosen`` (the plain MSE)."""

    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0, _, cond, _ = self._features(batch)
        timesteps, noise = self._draws(batch, epoch, x0)
        with self.accelerator.autocast():
            weights = self.timestep_weights(timesteps)
            logp = self.adapter.denoising_logp(x0, noise, timesteps, cond)
            metrics = {"mse_policy_chosen": -2 * logp.detach()}
            out = self.loss_fn(policy_chosen_logps=timestep_weighted(logp, weights))
            return out.losses.mean(), metrics


def train(config: Config) -> TrainResult:
    """Run SFT as ``config`` describes."""
    return SFTTrainer(config).train()
