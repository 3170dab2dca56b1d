"""Pretraining of the toy base model on deliberately noisy captions.

Data: ``n_images`` rendered specs (``sample_specs(n_images, seed)``). Image ``i``'s caption names a wrong colour,
uniform over the other colours, with probability ``caption_noise`` (drawn once per image, so the data set is a fixed
noisy-label set); the shape word is always right. A model that learns this conditional exactly puts probability
``1 - caption_noise`` on the prompted colour, which keeps the base's colour adherence well below 100%.

Objective (DDPM, Ho et al., 2020): ``E ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c)||²`` with
``t ~ U{0..999}``, and ``c = ""`` with probability ``caption_dropout`` (classifier-free guidance training), AdamW, a
linear warm-up then a cosine to ``min_lr_ratio · lr``. The saved weights are an exponential moving average of the
trained ones (decay ``ema_decay``; 0 saves the raw weights), which removes most residual noise from the samples of
such a short run.

The text encoder learns at ``text_encoder_lr_ratio · lr``; the base uses 0, i.e. it stays at its seeded random init
and only the UNet is trained, as SD trains its UNet under a frozen CLIP. Measured reason: trained jointly on noisy
captions, the encoder shrinks the difference between colour words (relative distance of the "red" vs "blue" token
features 0.04 after 3000 steps at 50% noise without EMA, against 0.5 at init and 1.4 with clean captions), and the
base ends up colour-blind (adherence 0.23, chance 0.25). Frozen, the same budget gives adherence ≈ 0.49.

Measured for :data:`BASE_CONFIG` (2 shared CPU cores, one thread): 709 s; evaluation sampler (20 steps, CFG 3, eta 1),
16 samples per prompt: colour adherence 0.59 / 0.60 / 0.65 (sampling seeds 0 / 1 / 2), shape adherence 0.71,
diversity 0.77; with deterministic DDIM (eta 0) 0.49 / 0.51 / 0.47, shape adherence 0.64.

Every random draw is addressed (``diffalign.utils.randomness``): the data order of epoch ``e`` is a permutation keyed
by ``(seed, e)``, and image ``i``'s noise, timestep and caption dropout in epoch ``e`` are keyed by ``(seed, e, i)``;
parameter init is seeded by ``seed``. A run is deterministic given its config (on one machine / torch build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from diffalign.toy.model import build_toy_model, save_toy_model, scheduler_config
from diffalign.toy.sampling import EVAL_ETA, EVAL_GUIDANCE_SCALE, EVAL_STEPS, evaluate_model
from diffalign.toy.world import COLOURS, caption_for, render_batch, sample_specs
from diffalign.utils.randomness import (
    NOISE,
    PROMPT_DROPOUT,
    TIMESTEP,
    per_sample_normal,
    per_sample_randint,
    per_sample_uniform,
    sample_generator,
)

# Stream ids of the data-set draws (0..4 are the shared per-sample streams of diffalign.utils.randomness).
CAPTION_NOISE_STREAM = 10
WRONG_COLOUR_STREAM = 11
SHUFFLE_STREAM = 12


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run (the committed base uses :data:`BASE_CONFIG`)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    text_encoder_lr_ratio: float = 0.0
    caption_noise: float = 0.5
    caption_dropout: float = 0.1
    n_images: int = 4096
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    seed: int = 0

    def __post_init__(self) -> None:
        check_image_settings(self)

    def hash(self) -> str:
        """Short stable digest of the config and the noise schedule (names the cache folder of :func:`ensure_base`)."""
        settings = {**asdict(self), "scheduler": scheduler_config()}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def check_image_settings(config: Any) -> None:
    """The checks of :class:`PretrainConfig` that :class:`~diffalign.toy.flow_pretrain.FlowPretrainConfig` shares:
    ``ema_decay`` in [0, 1), ``caption_noise`` / ``caption_dropout`` in [0, 1], ``n_images >= batch_size >= 1``."""
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"ema_decay={config.ema_decay}: must be in [0, 1) (0 disables the average)")
    if not 0.0 <= config.caption_noise <= 1.0 or not 0.0 <= config.caption_dropout <= 1.0:
        raise ValueError(
            f"caption_noise={config.caption_noise}, caption_dropout={config.caption_dropout}: both must be in [0, 1]"
        )
    if config.steps < 1 or config.batch_size < 1 or config.n_images < config.batch_size:
        raise ValueError(
            f"steps={config.steps}, batch_size={config.batch_size}, n_images={config.n_images}: need steps >= 1 and "
            "n_images >= batch_size >= 1"
        )


def check_unit_interval(config: Any, *names: str) -> None:
    """Raise ``ValueError`` unless each field ``names`` of ``config`` is in [0, 1]."""
    for name in names:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"{name}={getattr(config, name)}: must be in [0, 1]")


BASE_CONFIG = PretrainConfig()


def noisy_captions(n_images: int, caption_noise: float, seed: int) -> list[str]:
    """Caption of each of the ``n_images`` specs of ``seed``: right colour with probability ``1 - caption_noise``,
    else a wrong colour uniform over the others."""
    specs = sample_specs(n_images, seed)
    indices = range(n_images)
    flip = per_sample_uniform(seed, 0, indices, CAPTION_NOISE_STREAM) < caption_noise
    offset = per_sample_randint(len(COLOURS) - 1, seed, 0, indices, WRONG_COLOUR_STREAM) + 1
    captions = []
    for spec, f, o in zip(specs, flip.tolist(), offset.tolist(), strict=True):
        colour = COLOURS[(COLOURS.index(spec.colour) + o) % len(COLOURS)] if f else spec.colour
        captions.append(caption_for(colour, spec.shape))
    return captions


class LoopConfig(Protocol):
    """The optimisation settings :func:`train_steps` reads (every toy pretraining config has them)."""

    @property
    def steps(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def min_lr_ratio(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...


def _lr_factor(step: int, config: LoopConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batch_indices(step: int, config: PretrainConfig) -> tuple[int, list[int]]:
    """Epoch and data indices of ``step`` (each epoch is a fresh keyed permutation; a partial tail is dropped)."""
    per_epoch = config.n_images // config.batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(config.n_images, generator=sample_generator(config.seed, epoch, 0, SHUFFLE_STREAM))
    return epoch, perm[pos * config.batch_size : (pos + 1) * config.batch_size].tolist()


def train_steps(
    param_groups: list[dict[str, Any]],
    config: LoopConfig,
    step_loss: Callable[[int], torch.Tensor],
    *,
    modules: Sequence[torch.nn.Module],
    desc: str,
    progress: bool = True,
    ema_decay: float = 0.0,
    log_every: int = 10,
    postfix: Callable[[], dict[str, str]] | None = None,
) -> None:
    """The loop every toy pretraining shares: ``config.steps`` AdamW steps on ``param_groups`` (a group without
    ``lr`` gets ``config.lr``) of the loss ``step_loss(step)``, gradient norm clipped to ``config.max_grad_norm``,
    linear warm-up then cosine (:func:`_lr_factor`); ``modules`` in train mode during, eval mode after.

    With ``ema_decay > 0`` the parameters end as their exponential moving average (warm-up as in diffusers'
    ``EMAModel``). The progress bar shows loss and lr every ``log_every`` steps, plus ``postfix()``'s fields.
    """
    params = [p for group in param_groups for p in group["params"]]
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else None
    for module in modules:
        module.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress)
    for step in bar:
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1.0 - decay)
        schedule.step()
        if step % log_every == 0 or step == config.steps - 1:
            extra = postfix() if postfix is not None else {}
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}", **extra)
    if ema is not None:
        with torch.no_grad():
            torch._foreach_copy_(params, ema)
    for module in modules:
        module.eval()


def pretrain(
    output_dir: str | os.PathLike,
    *,
    config: PretrainConfig | None = None,
    progress: bool = True,
    eval_n_per_prompt: int = 0,
    **overrides: float | int,
) -> Path:
    """Pretrain the toy base and save it to ``output_dir`` (diffusers layout, see :mod:`diffalign.toy.model`).

    Settings come from ``config`` (default :data:`BASE_CONFIG`) with keyword ``overrides`` (``steps``,
    ``batch_size``, ``lr``, ``caption_noise``, ``seed``, ...). With ``eval_n_per_prompt > 0`` the saved model is
    evaluated (:func:`diffalign.toy.sampling.evaluate_model` defaults) and the metrics are written into
    ``model_index.json``.
    """
    config = PretrainConfig(**{**asdict(config or BASE_CONFIG), **overrides})
    started = time.time()
    model = build_toy_model(seed=config.seed)
    images = render_batch(sample_specs(config.n_images, config.seed)) * 2.0 - 1.0
    token_ids = model.tokenize(noisy_captions(config.n_images, config.caption_noise, config.seed))
    empty_ids = model.tokenize([""])
    groups: list[dict[str, Any]] = [{"params": list(model.unet.parameters()), "lr": config.lr}]
    if config.text_encoder_lr_ratio > 0:
        groups.append({"params": list(model.text_encoder.parameters()), "lr": config.lr * config.text_encoder_lr_ratio})
    else:
        model.text_encoder.requires_grad_(False)
    num_train_timesteps = model.scheduler.config.num_train_timesteps

    def step_loss(step: int) -> torch.Tensor:
        epoch, idx = _batch_indices(step, config)
        x0 = images[idx]
        noise = per_sample_normal(x0.shape[1:], config.seed, epoch, idx, NOISE)
        t = per_sample_randint(num_train_timesteps, config.seed, epoch, idx, TIMESTEP)
        drop = per_sample_uniform(config.seed, epoch, idx, PROMPT_DROPOUT) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids, token_ids[idx])
        x_t = model.scheduler.add_noise(x0, noise, t)
        context = model.text_encoder(ids).last_hidden_state
        return torch.nn.functional.mse_loss(model.unet(x_t, t, encoder_hidden_states=context).sample, noise)

    train_steps(
        groups,
        config,
        step_loss,
        modules=[model.unet, model.text_encoder],
        desc="toy pretrain",
        progress=progress,
        ema_decay=config.ema_decay,
    )
    info: dict = {"pretrain": asdict(config), "pretrain_seconds": round(time.time() - started, 1)}
    if eval_n_per_prompt > 0:
        eval_started = time.time()
        metrics = evaluate_model(model, n_per_prompt=eval_n_per_prompt, seed=0)
        info["eval"] = {
            "n_per_prompt": eval_n_per_prompt,
            "seed": 0,
            "steps": EVAL_STEPS,
            "guidance_scale": EVAL_GUIDANCE_SCALE,
            "eta": EVAL_ETA,
            **metrics,
        }
        info["eval_seconds"] = round(time.time() - eval_started, 1)
    return save_toy_model(model, output_dir, extra_info=info)


def default_base_path() -> Path:
    """The committed pretrained base, ``diffalign/toy/weights/base``."""
    return Path(__file__).resolve().parent / "weights" / "base"


def ensure_base(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of a usable base model: the committed one if present, else a cached or freshly pretrained one in
    ``cache_dir`` (default ``~/.cache/diffalign/toy``) under ``base-<config hash>``. Never downloads."""
    return ensure_pretrained(
        default_base_path(),
        f"base-{BASE_CONFIG.hash()}",
        lambda folder: pretrain(folder, config=BASE_CONFIG, progress=progress),
        cache_dir,
    )


def _has_model_index(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def ensure_pretrained(
    committed: Path,
    name: str,
    pretrain_into: Callable[[Path], object],
    cache_dir: str | os.PathLike | None = None,
    usable: Callable[[Path], bool] = _has_model_index,
) -> Path:
    """``committed`` if ``usable`` (default: it holds a ``model_index.json``), else ``cache_dir/name`` (default
    ``~/.cache/diffalign/toy``), pretrained there first by ``pretrain_into(folder)`` if not usable: into a temporary
    folder renamed into place, so an interrupted run leaves nothing half-written and concurrent writers do not
    clash."""
    if usable(committed):
        return committed
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "diffalign" / "toy"
    target = root / name
    if usable(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        pretrain_into(tmp)
        tmp.rename(target)
    except OSError:
        if not usable(target):  # not a concurrent writer winning the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the toy base model (diffalign.toy).")
    parser.add_argument("output_dir")
    for name, value in asdict(BASE_CONFIG).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--eval-n-per-prompt", type=int, default=16)
    args = vars(parser.parse_args(argv))
    output_dir, eval_n = args.pop("output_dir"), args.pop("eval_n_per_prompt")
    path = pretrain(output_dir, eval_n_per_prompt=eval_n, **args)
    print(json.dumps(json.loads((path / "model_index.json").read_text())["diffalign"], indent=2))


if __name__ == "__main__":
    main()
