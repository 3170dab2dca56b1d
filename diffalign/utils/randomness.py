"""Addressable randomness: every per-sample draw comes from (seed, epoch, sample index).

Drawing noise, timesteps, flips and prompt dropout from a generator keyed by the sample itself makes a run's result
independent of the number of processes and of where it was resumed, and keeps precomputed reference values valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK = (1 << 63) - 1


def sample_key(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """Mix the address into one 63-bit seed (splitmix64 finaliser; distinct streams give independent draws)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + stream) & ((1 << 64) - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & _MASK


def sample_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one sample's draws of one kind (``stream`` separates noise, timestep, flip, ...)."""
    return torch.Generator().manual_seed(sample_key(seed, epoch, index, stream))


# Stream ids, so that different kinds of draw for the same sample never share a generator.
NOISE, TIMESTEP, FLIP, PROMPT_DROPOUT, CROP = range(5)


def per_sample_normal(
    shape: Sequence[int], seed: int, epoch: int, indices: Sequence[int], stream: int = NOISE
) -> torch.Tensor:
    """Stack one standard-normal tensor of ``shape`` per index (float32, CPU)."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=sample_generator(seed, epoch, int(i), stream)) for i in indices]
    )


def per_sample_uniform(seed: int, epoch: int, indices: Sequence[int], stream: int) -> torch.Tensor:
    """One U[0, 1) float64 draw per index."""
    return torch.tensor(
        [
            torch.rand((), generator=sample_generator(seed, epoch, int(i), stream), dtype=torch.float64).item()
            for i in indices
        ],
        dtype=torch.float64,
    )


def per_sample_randint(
    high: int, seed: int, epoch: int, indices: Sequence[int], stream: int = TIMESTEP
) -> torch.Tensor:
    """One integer in [0, high) per index (int64)."""
    return torch.tensor(
        [int(torch.randint(high, (), generator=sample_generator(seed, epoch, int(i), stream))) for i in indices],
        dtype=torch.long,
    )
