"""Building blocks of the toy-world experiments (the demo and ``diffalign evidence``): prepare the world, train a
method from its ``configs/toy`` file, evaluate a run with the pixel-level gold metrics."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.config import Config, load_config
from diffalign.eval.weights import load_trained_unet
from diffalign.toy import RETRAIN
from diffalign.toy.configs import CONFIG_DIR, overrides_for
from diffalign.toy.metrics import summarize
from diffalign.toy.model import load_toy_model
from diffalign.toy.pairs import make_preference_pairs
from diffalign.toy.pretrain import ensure_base
from diffalign.toy.sampling import EVAL_ETA, evaluation_prompts, generate

PAIRS_VERSION = 2  # bump when make_preference_pairs changes what it writes (v2: DCPO-h loser captions)


@dataclass
class ToyWorld:
    base: Path
    pairs: Path
    workdir: Path


@dataclass
class Evaluation:
    metrics: dict[str, float]
    images: torch.Tensor
    prompts: list[str]


def prepare_world(
    workdir: str | os.PathLike,
    *,
    n_pairs: int = 2000,
    seed: int = 0,
    kind: str = "colour",
    label_noise: float = 0.0,
    base: str | os.PathLike | None = None,
) -> ToyWorld:
    """The pretrained base (``base``, or the UNet base: committed, cached or pretrained now) and the preference
    pairs (written once; ``label_noise``: see :func:`~diffalign.toy.pairs.make_preference_pairs`)."""
    workdir = Path(workdir)
    base = Path(base) if base is not None else ensure_base()
    noise = f"-noise{label_noise:g}" if label_noise else ""
    sampled = f"-{_short_hash(base)}" if kind == "on_policy" else ""  # sampled from this base: its pairs alone
    pairs = workdir / "data" / f"pairs-{kind}{sampled}-v{PAIRS_VERSION}-{n_pairs}-seed{seed}{noise}.parquet"
    if not pairs.is_file():
        make_preference_pairs(pairs, n_pairs, seed, kind=kind, label_noise=label_noise, base=base)
    return ToyWorld(base=base, pairs=pairs, workdir=workdir)


def _short_hash(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]


def method_config(method: str, world: ToyWorld, overrides: Sequence[str] = ()) -> Config:
    path = CONFIG_DIR / f"{method}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the toy configs live in the repository's configs/toy/")
    return load_config(
        path,
        [
            f"model.pretrained={world.base}",
            f"data.path={world.pairs}",
            f"data.cache_dir={world.workdir / 'cache'}",
            f"train.output_dir={world.workdir / 'runs' / method}",
            "train.progress_bar=true",
            RETRAIN,
            *overrides_for(method, overrides),
        ],
    )


def check_overrides(methods: Sequence[str], overrides: Sequence[str]) -> None:
    """Raise ``ConfigError`` now, before any data is built, if ``overrides`` do not apply to every method's config."""
    for method in methods:
        load_config(CONFIG_DIR / f"{method}.yaml", overrides_for(method, overrides))


def train_method(method: str, world: ToyWorld, overrides: Sequence[str] = ()) -> tuple[Path, float]:
    """Train ``configs/toy/{method}.yaml`` from the base; return (run dir, seconds)."""
    from diffalign.trainers.run import train

    config = method_config(method, world, overrides)
    started = time.perf_counter()
    train(config)
    return Path(config.train.output_dir), time.perf_counter() - started


def segment_cuts(total: int, segments: int, unit: int = 1) -> list[int]:
    """The step counts at which a ``total``-step run stops to be evaluated: ``segments`` near-equal parts, each
    ending on a multiple of ``unit`` (a rollout epoch for group RL)."""
    return sorted({max(unit, round(total * (i + 1) / segments / unit) * unit) for i in range(segments)})


def segment_overrides(cut: int, cuts: Sequence[int]) -> list[str]:
    """Overrides that train up to ``cut`` steps: the first segment afresh (replacing an earlier run), each later one
    resuming from the previous segment's checkpoint."""
    if cut == cuts[0]:
        start = [RETRAIN, "train.resume_from_checkpoint=auto"]
    else:
        start = ["train.overwrite_output_dir=false", "train.resume_from_checkpoint=latest"]
    return [f"train.max_steps={cut}", f"train.checkpointing_steps={cuts[0]}", *start]


def evaluate(
    base: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    *,
    n_per_prompt: int = 16,
    seed: int = 1234,
    eta: float = EVAL_ETA,
) -> Evaluation:
    """Gold metrics of the base (``run_dir=None``) or of a trained run, on ``n_per_prompt`` samples of each of the
    12 prompts (the evaluation sampler of :mod:`diffalign.toy.sampling`: 20 steps, CFG 3, ``eta`` default 1; fixed
    per-sample seeds so before/after compare the same noise)."""
    model = load_toy_model(base)
    if run_dir is not None:
        model.unet = load_trained_unet(base, run_dir).eval()
    prompts = evaluation_prompts(n_per_prompt)
    images = generate(model.unet, model.text_encoder, model.tokenizer, model.scheduler, prompts, seed=seed, eta=eta)
    return Evaluation(summarize(images, prompts), images, prompts)


def first_per_prompt(evaluation: Evaluation, k: int) -> torch.Tensor:
    """The first ``k`` samples of every prompt, prompt-major (for grids)."""
    n_per_prompt = evaluation.prompts.count(evaluation.prompts[0])
    picks = [p * n_per_prompt + j for p in range(len(evaluation.prompts) // n_per_prompt) for j in range(k)]
    return evaluation.images[picks]
