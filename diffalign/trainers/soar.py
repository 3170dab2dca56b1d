"""SOAR training (train.method soar): the flow-matching / denoising loss on the data plus SOAR's self-correction
loss at auxiliary off-trajectory points (:mod:`diffalign.models.soar`, :mod:`diffalign.losses.soar`).

Data: the preferred image of each row of a Pick-a-Pic-layout table, as the SFT baseline (``train.method sft``) uses;
with ``soar.lambda_aux = 0`` the loss is exactly that baseline's. Loss scale: the library's SFT convention
``−logp = ½·MSE`` for every term (the code's plain MSE is twice that; Adam does not see the factor).
"""

from __future__ import annotations

from typing import Any

import torch

from diffalign.config import Config
from diffalign.losses.soar import soar_loss
from diffalign.models.soar import soar_aux_points
from diffalign.trainers.base import TrainResult
from diffalign.trainers.diffusion_policy import timestep_weighted
from diffalign.trainers.sft import SFTTrainer


class SOARTrainer(SFTTrainer):
    """SFT's data, draws and main term plus the self-correction term at the auxiliary points."""

    def build(self) -> None:
        super().build()
        self.soar = self.config.soar
        self._uncond: dict[str, torch.Tensor] | None = None

    def _empty_prompt(self) -> dict[str, torch.Tensor] | None:
        if self.soar.cfg_scale == 1.0:
            return None
        if self._uncond is None:
            with torch.no_grad():
                self._uncond = {k: v.to(self.accelerator.device) for k, v in self.adapter.encode_prompts([""]).items()}
        return self._uncond

    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        adapter, seed, indices = self.adapter, self.config.train.seed, batch["index"].tolist()
        x0, _, cond, _ = self._features(batch)
        timesteps, noise = self._draws(batch, epoch, x0)  # SFT's draws: lambda 0 gives SFT's loss exactly
        with self.accelerator.autocast():
            logp = adapter.denoising_logp(x0, noise, timesteps, cond)
            metrics = {"mse_main": -2 * logp.detach()}
            main = -timestep_weighted(logp, self.timestep_weights(timesteps))
            if self.soar.lambda_aux == 0:
                return self.loss_fn(policy_chosen_logps=-main).losses.mean(), metrics
            uncond = self._empty_prompt()
            points = soar_aux_points(
                adapter, x0, noise, timesteps, cond, uncond, self.soar, seed=seed, epoch=epoch, indices=indices
            )
            rows = points.sample_index
            pred = adapter.predict(points.inputs, points.timesteps, {k: v[rows] for k, v in cond.items()})
            aux_mse = (pred.float() - points.targets).pow(2).mean(dim=tuple(range(1, pred.ndim)))
            aux = 0.5 * timestep_weighted(aux_mse, self.timestep_weights(points.timesteps))
            loss = soar_loss(main, aux, lambda_aux=self.soar.lambda_aux, count=self._normaliser(main, aux))
        per_sample = torch.zeros(len(indices), device=aux_mse.device).index_add_(
            0, points.sample_index, aux_mse.detach()
        )
        metrics["mse_aux"] = per_sample / torch.bincount(points.sample_index, minlength=len(indices)).clamp_min(1)
        return loss, metrics

    def _normaliser(self, main: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """``(B + λ·P)`` all-reduced, over the number of processes (the code's global normalisation under DDP's
        gradient average; equal to the local count when every process has the same number of points)."""
        count = torch.tensor(float(main.numel() + self.soar.lambda_aux * aux.numel()), device=main.device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum") / self.accelerator.num_processes
        return count


def train(config: Config) -> TrainResult:
    """Run SOAR as ``config`` describes."""
    return SOARTrainer(config).train()
