"""What every part of the benchmark shares: the path of the script (re-invoked for its workers), the training
hyper-parameters all contenders use, the run ``Settings``, the ``Contender`` record and the environment of the
subprocesses."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffalign.utils.benchmark import ProcessRun

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench_offline.py"  # re-invoked as --worker prepare / floor
NEVER = 10**9  # a checkpointing interval no run reaches
OURS_BETA, DIFFUSERS_BETA = 5000, 2500  # the same loss: diffusers' logit lacks Diffusion-DPO's factor 1/2
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass(frozen=True)
class Settings:
    python: str
    work_dir: Path
    resolution: int
    image_min: int
    image_max: int
    images: str
    vae_levels: int
    pairs: int
    batch_size: int
    rank: int
    threads: int
    num_workers: int
    device: str
    seed: int
    prime_steps: int
    short_steps: int
    long_steps: int
    repeats: int
    timeout_s: float
    statistic: str = "min"


@dataclass
class Contender:
    """One way of training: ``argv(steps, output_dir)`` builds its command; ``check`` verifies a finished run;
    ``collect`` reads what a finished long run left (losses, in-process step times, weights) before it is deleted."""

    name: str
    argv: Callable[[int, Path], list[str]]
    env: dict[str, str]
    cwd: Path
    check: Callable[[Path, int], None]
    runs: dict[int, list[ProcessRun]] = field(default_factory=dict)
    in_process_step_s: list[float] = field(default_factory=list)
    prime_wall_s: float = float("nan")
    before_run: Callable[[], None] | None = None  # called before every run (e.g. to wipe a reference store)
    loss_curves: list[list[float]] = field(default_factory=list)  # per-step losses of each long run
    step_times: Callable[[Path], list[float]] | None = None  # in-process seconds of each step of a finished run
    losses: Callable[[Path], list[float]] | None = None  # per-step losses of a finished run
    lora_file: str | None = None  # the LoRA weights file a finished run leaves in its output folder
    lora_copies: list[Path] = field(default_factory=list)  # kept copies of it (first long run)


def base_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    threads = str(s.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        HF_HOME=str(s.work_dir / "hf_home"),  # no user accelerate config or hub cache leaks in
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONHASHSEED=str(s.seed),
    )
    if s.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def prepend_path(env: dict[str, str], key: str, path: Path) -> None:
    env[key] = os.pathsep.join([str(path), *([env[key]] if env.get(key) else [])])
