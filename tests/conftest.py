"""Shared fixtures: tiny SD model folders written once per test session (no downloads).

``tiny_sd_dirs[name]`` is a diffusers-layout folder built by ``save_tiny_sd_pipeline(**TINY_SD_VARIANTS[name])``:
"eps" (VAE, epsilon), "v" (VAE, v-prediction) and "pixel" (no VAE, epsilon). A test that needs the in-memory
originals rebuilds them with ``tiny_sd_components(**TINY_SD_VARIANTS[name])`` (same seed, same weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed CPU two threads made first forwards
# ~100x slower (3 s instead of 0.02 s). Override with DIFFALIGN_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("DIFFALIGN_TEST_THREADS", "1")))

TINY_SD_VARIANTS: dict[str, dict[str, Any]] = {
    "eps": {"prediction_type": "epsilon", "with_vae": True, "seed": 0},
    "v": {"prediction_type": "v_prediction", "with_vae": True, "seed": 1},
    "pixel": {"prediction_type": "epsilon", "with_vae": False, "seed": 2},
}


@pytest.fixture(scope="session")
def tiny_sd_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffalign.models.tiny import save_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("tiny_sd")
    return {name: save_tiny_sd_pipeline(root / name, **kwargs) for name, kwargs in TINY_SD_VARIANTS.items()}


@pytest.fixture(scope="session")
def tiny_sd_variants() -> dict[str, dict[str, Any]]:
    """The keyword arguments each ``tiny_sd_dirs`` folder was built with."""
    return {name: dict(kwargs) for name, kwargs in TINY_SD_VARIANTS.items()}
