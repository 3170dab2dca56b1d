"""Checks every flow-transformer backbone's tests share (FLUX, Qwen-Image, Z-Image): a LoRA that changes the output,
and re-evaluating each step of a stored rollout with the same code path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.lora import add_lora
from diffalign.models.rollout import SamplerSettings, Trajectory, build_schedule, step_log_prob


def add_perturbed_lora(adapter: DiffusionAdapter, targets: Sequence[str], *, rank: int = 4, std: float = 0.05) -> None:
    """A LoRA on ``targets`` whose B matrices are drawn N(0, std²) from one seeded generator (B = 0 at init would be a
    no-op), in parameter order, so the weights are the same in every process."""
    add_lora(adapter.denoiser, rank=rank, target_modules=tuple(targets), exclude_modules=adapter.unused_modules())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def assert_steps_rescore_exactly(
    adapter: DiffusionAdapter,
    settings: SamplerSettings,
    trajectory: Trajectory,
    uncond: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every step of ``trajectory`` re-evaluated with :func:`step_log_prob` gives its stored log-prob bit for bit
    (the PPO ratio is exactly 1 before an update)."""
    schedule, latents = build_schedule(adapter, settings), trajectory.latents
    for k in range(schedule.num_steps):
        with torch.no_grad():
            again = step_log_prob(
                adapter, settings, schedule, k, latents[:, k], latents[:, k + 1], trajectory.cond, uncond
            )
        assert torch.equal(again.log_prob, trajectory.log_probs[:, k]), f"step {k}"
