"""Pretraining of the toy flow base model (:mod:`diffalign.toy.flow_model`) on deliberately noisy captions.

Data: exactly :mod:`diffalign.toy.pretrain`'s: ``n_images`` rendered specs of ``seed`` in [-1, 1], and
:func:`diffalign.toy.pretrain.noisy_captions` (image ``i``'s caption names a wrong colour with probability
``caption_noise``, drawn once per image; the shape word is always right), the same keyed epoch permutations, and
caption dropout (``""`` with probability ``caption_dropout``) for classifier-free guidance.

Objective: rectified-flow matching as SD3 trains it (Esser et al., 2024; diffusers'
``examples/dreambooth/train_dreambooth_sd3.py``): ``E ||v_θ(x_σ, σ, c) - (ε - x0)||²`` with
``x_σ = (1 - σ)·x0 + σ·ε``; the timestep index is ``⌊u · 1000⌋`` with ``u = sigmoid(m + s·n)``, ``n ~ N(0, 1)``
(logit-normal, ``m = 0``, ``s = 1``, loss weight 1: SD3's default ``weighting_scheme="logit_normal"``) or
``u ~ U[0, 1)`` (``timestep_sampling="uniform"``), and σ, t are the training scheduler's ``sigmas`` / ``timesteps``
at that index (σ ∈ {0.001, ..., 1}, t = σ·1000). AdamW, linear warm-up then cosine, an EMA of the weights saved
(as :mod:`diffalign.toy.pretrain`). Both CLIP text encoders stay frozen at their seeded init (the measured reason
is in :mod:`diffalign.toy.pretrain`), so the conditioning of every caption is computed once.

Measured for :data:`FLOW_BASE_CONFIG` (shared 2-core CPU, one thread): 333 s of pretraining (3000 steps of 32,
≈ 0.11 s per step). Evaluation, 20 steps, CFG 3, 16 samples per prompt (192), sampling seeds 0 / 1 / 2:

* ODE (Euler): colour adherence 0.53 / 0.53 / 0.47, shape adherence 0.73 / 0.71 / 0.69, diversity 0.86 / 0.86 / 0.86;
* SDE (Flow-GRPO, a = 0.7): colour adherence 0.57 / 0.62 / 0.53, shape adherence 0.62 / 0.56 / 0.59, diversity 0.76;
* seed 0, 10 steps (Flow-GRPO's rollout length): ODE 0.53 / shape 0.70, SDE 0.59 / shape 0.47 / diversity 0.64;
  without guidance (CFG 1, ODE): colour adherence 0.37.

Choices, measured on seed 0 with the same 3000-step budget (one run each, ±3.5 points at 192 samples):

* Timestep density: logit-normal against uniform (width-64 × 6-block transformer, lr 1e-3): colour adherence
  0.48 vs 0.65 (ODE), 0.51 vs 0.68 (SDE), but shape adherence 0.46 vs 0.42 (ODE), 0.46 vs 0.35 (SDE): uniform spends
  7× more samples at σ > 0.9 (10% vs 1.4%) and fewer at mid-range σ (our reading: the colour is settled at high
  noise, the edges at mid noise). Logit-normal (SD3's default) is kept: the base should be weak in colour (room for
  preference training) and clean in shape.
* Width 96 × 3 blocks: lr 1e-3 without q/k norm: adherence 0.58, shape 0.50 (3600 steps: 0.58, shape 0.55); with
  RMS q/k norm, lr 2e-3: 0.53, shape 0.65; lr 3e-3 (kept): 0.53, shape 0.73.

Every random draw is addressed (``diffalign.utils.randomness``): the data order of epoch ``e`` is a permutation keyed
by ``(seed, e)``, and image ``i``'s noise, timestep and caption dropout in epoch ``e`` are keyed by ``(seed, e, i)``;
parameter init is seeded by ``seed``. A run is deterministic given its config (on one machine / torch build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffalign.toy.flow_model import (
    T5_TOKENS,
    ToyFlowModel,
    build_toy_flow_model,
    predict_velocity,
    save_toy_flow_model,
    scheduler_config,
    transformer_config,
)
from diffalign.toy.flow_sampling import EVAL_GUIDANCE_SCALE, EVAL_STEPS, SDE_NOISE_LEVEL, evaluate_flow_model
from diffalign.toy.pretrain import (
    _batch_indices,
    check_image_settings,
    ensure_pretrained,
    noisy_captions,
    train_steps,
)
from diffalign.toy.world import render_batch, sample_specs
from diffalign.utils.randomness import NOISE, PROMPT_DROPOUT, TIMESTEP, per_sample_normal, per_sample_uniform

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


@dataclass(frozen=True)
class FlowPretrainConfig:
    """Settings of one flow pretraining run (the cached base uses :data:`FLOW_BASE_CONFIG`). The text encoders are
    always frozen (no ``text_encoder_lr_ratio``)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-3
    caption_noise: float = 0.5
    caption_dropout: float = 0.1
    n_images: int = 4096
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_image_settings(self)
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling={self.timestep_sampling!r}: use one of {TIMESTEP_SAMPLINGS}")

    def hash(self) -> str:
        """Short stable digest of the config and the model's architecture (names the cache folder of
        :func:`ensure_flow_base`)."""
        key = {
            "config": asdict(self),
            "transformer": transformer_config(),
            "scheduler": scheduler_config(),
            "max_sequence_length": T5_TOKENS,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


FLOW_BASE_CONFIG = FlowPretrainConfig()


def sample_training_sigmas(
    config: FlowPretrainConfig, num_train_timesteps: int, epoch: int, indices: list[int]
) -> torch.Tensor:
    """Per-sample training index into the scheduler's 1000 sigmas, ``⌊u · num_train_timesteps⌋`` with
    ``u = sigmoid(logit_mean + logit_std · n)`` (SD3's logit-normal density) or ``u ~ U[0, 1)``; keyed by
    ``(seed, epoch, index)`` on the TIMESTEP stream. Returns int64 ``[B]``."""
    if config.timestep_sampling == "logit_normal":
        n = per_sample_normal((), config.seed, epoch, indices, TIMESTEP)
        u = torch.sigmoid(config.logit_mean + config.logit_std * n)
    else:
        u = per_sample_uniform(config.seed, epoch, indices, TIMESTEP).float()
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def flow_matching_loss(
    model: ToyFlowModel,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_projections: torch.Tensor,
) -> torch.Tensor:
    """``mean ||v_θ((1 - σ)·x0 + σ·ε, σ, c) - (ε - x0)||²`` (rectified flow, unweighted as SD3's logit-normal)."""
    s = sigma.reshape(-1, 1, 1, 1).to(x0.dtype)
    x_t = (1.0 - s) * x0 + s * noise
    v = predict_velocity(model.transformer, x_t, sigma, prompt_embeds, pooled_projections)
    return torch.nn.functional.mse_loss(v.float(), (noise - x0).float())


def pretrain_flow(
    output_dir: str | os.PathLike,
    *,
    config: FlowPretrainConfig | None = None,
    progress: bool = True,
    eval_n_per_prompt: int = 0,
    **overrides: float | int | str,
) -> Path:
    """Pretrain the toy flow base and save it to ``output_dir`` (SD3 diffusers layout, see
    :mod:`diffalign.toy.flow_model`).

    Settings come from ``config`` (default :data:`FLOW_BASE_CONFIG`) with keyword ``overrides``. With
    ``eval_n_per_prompt > 0`` the saved model is evaluated with both samplers (ODE and SDE ``a = 0.7``; 20 steps,
    CFG 3, sampling seed 0) and the metrics go into ``model_index.json["diffalign"]["eval"]``.
    """
    config = FlowPretrainConfig(**{**asdict(config or FLOW_BASE_CONFIG), **overrides})
    started = time.time()
    model = build_toy_flow_model(seed=config.seed)
    images = render_batch(sample_specs(config.n_images, config.seed)) * 2.0 - 1.0
    captions = noisy_captions(config.n_images, config.caption_noise, config.seed)
    vocabulary = ["", *sorted(set(captions))]
    model.text_encoder.requires_grad_(False)
    model.text_encoder_2.requires_grad_(False)
    with torch.no_grad():
        all_embeds, all_pooled = model.encode_prompts(vocabulary)
    caption_ids = torch.tensor([vocabulary.index(c) for c in captions])
    train_sigmas = model.scheduler.sigmas.float()  # the training schedule, σ_i = (1000 - i) / 1000
    num_train_timesteps = model.scheduler.config.num_train_timesteps

    def step_loss(step: int) -> torch.Tensor:
        epoch, idx = _batch_indices(step, config)
        x0 = images[idx]
        noise = per_sample_normal(x0.shape[1:], config.seed, epoch, idx, NOISE)
        sigma = train_sigmas[sample_training_sigmas(config, num_train_timesteps, epoch, idx)]
        drop = per_sample_uniform(config.seed, epoch, idx, PROMPT_DROPOUT) < config.caption_dropout
        rows = torch.where(drop, 0, caption_ids[idx])
        return flow_matching_loss(model, x0, noise, sigma, all_embeds[rows], all_pooled[rows])

    train_steps(
        [{"params": list(model.transformer.parameters())}],
        config,
        step_loss,
        modules=[model.transformer],
        desc="toy flow pretrain",
        progress=progress,
        ema_decay=config.ema_decay,
    )
    info: dict = {"pretrain": asdict(config), "pretrain_seconds": round(time.time() - started, 1)}
    if eval_n_per_prompt > 0:
        eval_started = time.time()
        info["eval"] = {"n_per_prompt": eval_n_per_prompt, "seed": 0, "steps": EVAL_STEPS}
        info["eval"]["guidance_scale"] = EVAL_GUIDANCE_SCALE
        for name, level in (("ode", 0.0), ("sde", SDE_NOISE_LEVEL)):
            metrics = evaluate_flow_model(model, n_per_prompt=eval_n_per_prompt, seed=0, noise_level=level)
            info["eval"][name] = {"noise_level": level, **metrics}
        info["eval_seconds"] = round(time.time() - eval_started, 1)
    return save_toy_flow_model(model, output_dir, extra_info=info)


def default_flow_base_path() -> Path:
    """Where a committed pretrained flow base would live, ``diffalign/toy/weights/flow_base``."""
    return Path(__file__).resolve().parent / "weights" / "flow_base"


def ensure_flow_base(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of a usable flow base model: the committed one if present, else a cached or freshly pretrained one in
    ``cache_dir`` (default ``~/.cache/diffalign/toy``, next to the UNet base) under ``flow-base-<config hash>``.
    Never downloads."""
    return ensure_pretrained(
        default_flow_base_path(),
        f"flow-base-{FLOW_BASE_CONFIG.hash()}",
        lambda folder: pretrain_flow(folder, config=FLOW_BASE_CONFIG, progress=progress),
        cache_dir,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pretrain the toy flow base model (diffalign.toy, SD3-style).")
    parser.add_argument("output_dir")
    for name, value in asdict(FLOW_BASE_CONFIG).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--eval-n-per-prompt", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = vars(parser.parse_args(argv))
    output_dir, eval_n = args.pop("output_dir"), args.pop("eval_n_per_prompt")
    torch.set_num_threads(args.pop("threads"))
    path = pretrain_flow(output_dir, eval_n_per_prompt=eval_n, **args)
    print(json.dumps(json.loads((path / "model_index.json").read_text())["diffalign"], indent=2))


if __name__ == "__main__":
    main()
