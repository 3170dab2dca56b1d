"""Shared fixtures: tiny SD model folders written once per test session (no downloads).

``tiny_sd_dirs[name]`` is a diffusers-layout folder built by ``save_tiny_sd_pipeline(**TINY_SD_VARIANTS[name])``:
"eps" (VAE, epsilon), "v" (VAE, v-prediction) and "pixel" (no VAE, epsilon). A test that needs the in-memory
originals rebuilds them with ``tiny_sd_components(**TINY_SD_VARIANTS[name])`` (same seed, same weights).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
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


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def run_train_script() -> Callable[..., subprocess.CompletedProcess]:
    """``run(args, processes=1, accelerate_config=None)``: ``scripts/train.py args`` as a subprocess, under
    accelerate's multi-process CPU launch (torchrun-style workers on gloo, no MPI) when ``processes > 1``, with
    ``accelerate_config`` (a file of configs/accelerate/, e.g. ``"fsdp.yaml"``) instead of plain ``--multi_gpu`` when
    given; one intra-op thread each."""

    def run(
        args: Sequence[str], *, processes: int = 1, accelerate_config: str | None = None
    ) -> subprocess.CompletedProcess:
        script = [str(REPO / "scripts" / "train.py"), *args]
        if processes == 1:
            command = [sys.executable, *script]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch"]
            if accelerate_config is None:
                command.append("--multi_gpu")
            else:
                command += ["--config_file", str(REPO / "configs" / "accelerate" / accelerate_config)]
            command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
            command += ["--dynamo_backend", "no", "--main_process_port", "0", *script]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
        return subprocess.run(command, capture_output=True, text=True, env=env)

    return run


@pytest.fixture(scope="session")
def pixel_pipeline(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny pixel-space SD pipeline (16 px UNet, no VAE) saved with ``save_pretrained``; tests only read it."""
    from diffalign.models.tiny import save_tiny_sd_pipeline

    return str(save_tiny_sd_pipeline(tmp_path_factory.mktemp("pix") / "model", with_vae=False, sample_size=16))


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """16 random 16 px preference pairs in the Pick-a-Pic layout (``make_random_pairs(16, size=16, seed=0)``)."""
    from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet

    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    write_pickapic_parquet(path, make_random_pairs(16, size=16, seed=0))
    return str(path)
