"""The toy world on the flow-matching base (:mod:`diffalign.toy.flow_model`): the same pairs and gold metric as the
UNet world, trained through the same offline trainer (the SD3 adapter), judged with the flow samplers.

The evaluation sampler is the Euler ODE (the sampler SD3 ships with; ``noise_level`` 0); the Flow-GRPO SDE
(``noise_level`` 0.7) is reported beside it, as the UNet world reports DDIM η = 0 beside η = 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffalign.errors import DiffalignError
from diffalign.eval.weights import load_trained_denoiser
from diffalign.toy.experiment import Evaluation, ToyWorld, prepare_world
from diffalign.toy.flow_model import load_toy_flow_model
from diffalign.toy.flow_pretrain import ensure_flow_base
from diffalign.toy.flow_sampling import EVAL_NOISE_LEVEL, SDE_NOISE_LEVEL, generate
from diffalign.toy.metrics import summarize
from diffalign.toy.sampling import evaluation_prompts

FLOW_METHODS = ("flow_dpo", "flow_sft")
ALTERNATIVE_NOISE_LEVEL = SDE_NOISE_LEVEL


def prepare_flow_world(
    workdir: str | os.PathLike, *, n_pairs: int = 2000, seed: int = 0, kind: str = "colour"
) -> ToyWorld:
    """The flow base (committed, cached or pretrained now) and the toy preference pairs (rendered ``kind`` only:
    on-policy pairs are sampled from the UNet base)."""
    if kind == "on_policy":
        raise DiffalignError("--pairs on_policy samples the UNet base: use it with `evidence offline`, not `flow`")
    return prepare_world(workdir, n_pairs=n_pairs, seed=seed, kind=kind, base=ensure_flow_base())


def evaluate_flow(
    base: str | os.PathLike,
    run_dir: str | os.PathLike | None = None,
    *,
    n_per_prompt: int = 16,
    seed: int = 1234,
    noise_level: float = EVAL_NOISE_LEVEL,
) -> Evaluation:
    """Gold metrics of the flow base (``run_dir=None``) or of a trained run (its ``transformer/`` or LoRA applied),
    on ``n_per_prompt`` samples of each of the 12 prompts (20 steps, CFG 3, fixed per-sample seeds)."""
    model = load_toy_flow_model(base)
    if run_dir is not None:
        model.transformer = load_trained_denoiser(base, run_dir, "transformer").eval()
    prompts = evaluation_prompts(n_per_prompt)
    images = generate(model, prompts, seed=seed, noise_level=noise_level)
    return Evaluation(summarize(images, prompts), images, prompts)


def flow_base_path() -> Path:
    """Path of the flow base, pretraining it on first use."""
    return ensure_flow_base()
