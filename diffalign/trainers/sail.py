"""SAIL, the self-amplified iterative loop (train.method sail; SAIL, arXiv 2602.05380).

Round 0 is Diffusion-DPO on the small seed set (``data.path``) from ``model.pretrained``. Round ``i ≥ 1``:

1. sample ``sail.samples_per_prompt`` images for each of ``sail.prompts_per_round`` prompt groups with the current
   model (prompts from ``sail.prompts``, taken in order across rounds so that rounds see fresh prompts while the
   file lasts; it is cycled, with fresh seeds, when it runs out);
2. score every image with the implicit DPO reward averaged over ``sail.reward_draws`` (t, ε) draws shared by the
   group (:mod:`diffalign.eval.implicit_reward`); the judge's policy is the current model (``judge_policy:
   current``) or the round-0 model (``anchor``), its reference the model the current one was trained from
   (``judge_reference: previous``) or the pretrained base (``base``);
3. pair each group's best against its worst and mix with the seed pairs (self-generated fraction
   ``sail.self_fraction``; :mod:`diffalign.data.self_pairs`);
4. Diffusion-DPO on the mixture with the current model as initialisation and reference.

After each round the trained model is exported as a diffusers pipeline folder (``round_i/model``: the trained
denoiser, with LoRA merged in, beside the base's ``model_index.json`` and links to its other components,
:mod:`diffalign.models.export`), which the next round loads. Every round writes its pairs (``round_i/pairs.parquet``),
its metrics (``round_i/round.json``, written last and atomically: a round is done when it exists) and its training
run; a stopped loop resumes at the first unfinished round, inside which the DPO run resumes from its latest
checkpoint and a finished sampling step is not redone. ``train.overwrite_output_dir: true`` removes the earlier
loop's rounds first and starts again at round 0.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffalign.config import Config
from diffalign.data.prompts import load_prompts
from diffalign.data.self_pairs import best_worst_pairs, mix_with_seed, read_rows
from diffalign.data.synthetic import write_pickapic_parquet
from diffalign.eval.implicit_reward import implicit_dpo_rewards
from diffalign.eval.weights import DENOISER_CLASSES, load_trained_denoiser, trained_weights_kind
from diffalign.models.backbones import resolve_backbone
from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.export import PipelineBase, pipeline_base, write_pipeline_folder
from diffalign.models.loading import adapter_from_config
from diffalign.models.rollout import SamplerSettings, conditioning, rollout
from diffalign.trainers.base import TrainResult

logger = logging.getLogger(__name__)

SAIL_SAMPLE_STREAM = 40


def export_model(base: PipelineBase, run_dir: Path, out: Path, subfolder: str) -> Path:
    """Write ``out``: the trained denoiser of ``run_dir`` (LoRA merged in) with ``base``'s other components and
    index (:func:`~diffalign.models.export.write_pipeline_folder`); atomic: built beside ``out`` and renamed into
    place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    load_trained_denoiser(base.folder, run_dir, subfolder).save_pretrained(tmp / subfolder)
    write_pipeline_folder(base, tmp, subfolder)
    if out.exists():  # an export of a round whose record was not written yet: the round is redone from here
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _round_config(config: Config, *, pretrained: Path, data: str, output_dir: Path, steps: int) -> Config:
    cfg = copy.deepcopy(config)
    cfg.train.method = "dpo"
    cfg.model.pretrained = str(pretrained)
    cfg.data.path = data
    cfg.train.output_dir = str(output_dir)
    cfg.train.max_steps = steps
    cfg.train.checkpointing_steps = min(cfg.train.checkpointing_steps, steps)
    cfg.train.resume_from_checkpoint = "latest"  # a round started before (its folder exists) carries on
    cfg.train.overwrite_output_dir = False  # the loop's own overwrite already cleared the rounds (run_sail)
    return cfg


def _adapter(config: Config, folder: Path) -> DiffusionAdapter:
    model = copy.deepcopy(config.model)
    model.pretrained = str(folder)
    adapter = adapter_from_config(model)
    adapter.to("cuda" if torch.cuda.is_available() else "cpu")
    adapter.denoiser.eval()
    return adapter


def _with_denoiser(adapter: DiffusionAdapter, folder: Path, subfolder: str) -> DiffusionAdapter:
    """``adapter`` evaluating the denoiser saved in ``folder`` (a judge's policy or reference)."""
    denoiser = DENOISER_CLASSES[subfolder].from_pretrained(folder, subfolder=subfolder)
    return adapter.with_denoiser(denoiser.to(adapter.device).eval())


def sample_and_judge(config: Config, round_index: int, models: list[Path], subfolder: str) -> tuple[list, dict]:
    """Steps 1–3 of a round: the self-generated best-vs-worst rows and the judge's statistics."""
    sc, seed = config.sail, config.train.seed
    prompts = load_prompts(sc.prompts)
    first = (round_index - 1) * sc.prompts_per_round
    group_prompts = [prompts[(first + g) % len(prompts)] for g in range(sc.prompts_per_round)]
    settings = SamplerSettings(
        kind=sc.sampler,
        steps=sc.sample_steps,
        guidance_scale=sc.guidance_scale,
        noise_level=sc.noise_level,
        resolution=config.data.resolution,
    )
    current = _adapter(config, models[-1])
    n = sc.samples_per_prompt
    candidates = [(g, p) for g, p in enumerate(group_prompts) for _ in range(n)]
    images = []
    for lo in tqdm(range(0, len(candidates), sc.sample_batch_size), desc=f"SAIL round {round_index}: sampling"):
        chunk = candidates[lo : lo + sc.sample_batch_size]
        indices = [(first * n + lo + j) for j in range(len(chunk))]
        out = rollout(current, [p for _, p in chunk], settings, seed=seed + SAIL_SAMPLE_STREAM, indices=indices)
        images.append(out.images.cpu())
    images = torch.cat(images)
    policy = current if sc.judge_policy == "current" else _with_denoiser(current, models[1], subfolder)
    reference = _with_denoiser(current, models[-2] if sc.judge_reference == "previous" else models[0], subfolder)
    groups = [first + g for g, _ in candidates]
    prompts_per_candidate = [p for _, p in candidates]
    with torch.no_grad():
        x0 = torch.cat(
            [current.encode_images(images[i : i + 64].to(current.device) * 2 - 1) for i in range(0, len(images), 64)]
        )
        cond = conditioning(current, prompts_per_candidate, config.data.resolution)
    rewards = implicit_dpo_rewards(
        policy, reference, x0, cond, groups, beta=config.loss.beta, draws=sc.reward_draws, seed=seed, epoch=round_index
    )
    return best_worst_pairs(images, prompts_per_candidate, rewards, groups)


def run_sail(config: Config) -> TrainResult:
    """Run (or resume) the whole loop; returns the last round's training result."""
    from diffalign.trainers.offline import train as train_dpo

    sc = config.sail
    out = Path(config.train.output_dir)
    if config.train.overwrite_output_dir:
        _clear_rounds(out)
    out.mkdir(parents=True, exist_ok=True)
    base = pipeline_base(config.model)
    subfolder = resolve_backbone(config.model.backbone, base.folder).denoiser_subfolder
    seed_rows = None
    models, result = [base.folder], TrainResult(out, 0, 0, 0.0)
    for r in range(sc.rounds + 1):
        round_dir = out / f"round_{r}"
        done = round_dir / "round.json"
        if done.is_file():
            models.append(round_dir / "model")
            logger.info("SAIL round %d already done (%s)", r, done)
            continue
        started, stats = time.perf_counter(), {}
        round_dir.mkdir(parents=True, exist_ok=True)
        if r == 0:
            data = config.data.path
        else:
            data = str(round_dir / "pairs.parquet")
            if not Path(data).is_file():
                self_rows, stats = sample_and_judge(config, r, models, subfolder)
                write_pickapic_parquet(round_dir / "self_pairs.parquet", self_rows)
                seed_rows = seed_rows or read_rows(config.data.path)[: config.data.max_samples]
                mixed = mix_with_seed(seed_rows, self_rows, self_fraction=sc.self_fraction, seed=config.train.seed + r)
                write_pickapic_parquet(round_dir / "pairs.parquet.tmp", mixed)
                os.replace(round_dir / "pairs.parquet.tmp", data)
                (round_dir / "judge.json").write_text(json.dumps(stats, indent=2) + "\n")
            else:
                stats = json.loads((round_dir / "judge.json").read_text())
        steps = config.train.max_steps if r == 0 else (sc.steps_per_round or config.train.max_steps)
        run_dir = round_dir / "train"
        round_config = _round_config(config, pretrained=models[-1], data=data, output_dir=run_dir, steps=steps)
        if r > 0:
            round_config.data.max_samples = None
        if trained_weights_kind(run_dir, subfolder) is None:
            result = train_dpo(round_config)
        export_model(replace(base, folder=models[-1]), run_dir, round_dir / "model", subfolder)
        record = {"round": r, "data": data, "steps": steps, "seconds": time.perf_counter() - started, **stats}
        (round_dir / "round.json.tmp").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(round_dir / "round.json.tmp", done)
        models.append(round_dir / "model")
        logger.info("SAIL round %d done: %s", r, record)
    (out / "final_model.txt").write_text(str(models[-1]) + "\n")
    return result


def _clear_rounds(out: Path) -> None:
    """``train.overwrite_output_dir``: remove an earlier loop's ``round_*`` folders and ``final_model.txt``."""
    earlier = sorted(out.glob("round_*")) + ([out / "final_model.txt"] if (out / "final_model.txt").is_file() else [])
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if earlier:
        names = ", ".join(p.name for p in earlier)
        logger.warning("train.overwrite_output_dir: removed the earlier SAIL loop's %s from %s", names, out)


def sail_rounds(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``round.json`` records of a SAIL run, in order."""
    return [json.loads(p.read_text()) for p in sorted(Path(output_dir).glob("round_*/round.json"))]
