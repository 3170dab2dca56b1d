"""Generate evaluation images from any backbone (SD 1.x/2.x, SDXL, SD3, the toy bases), resumably.

:func:`generate_images` writes one PNG per (prompt, sample) into ``output_dir`` and one line per image into
``metadata.jsonl`` (``file``, ``prompt``, ``prompt_index``, ``sample_index``, ``seed``, ``noise_index``); the
settings of the run go to ``generation.json``.

* Fixed seeds: sample ``s`` of prompt ``p`` always gets the noise index ``p · NOISE_STRIDE + s``, and every draw
  of a sample (initial noise, SDE / DDIM step noise) is addressed by ``(seed, noise_index)``
  (:func:`diffalign.models.rollout.rollout`). So the image does not depend on ``--n-per-prompt`` or on the other
  prompts, and two models generated with the same prompts and seed start every sample from the same noise (paired
  comparisons in :mod:`diffalign.eval.winrate`).
* Resumable: a rerun skips the images whose PNG and metadata line exist. Images are produced in a fixed batch grid
  (the canonical order, cut every ``batch_size``): an incomplete batch is sampled again as a whole and only its
  missing files are written, so with the same ``batch_size`` a resumed folder is byte-identical to an uninterrupted
  one even where kernels depend on the batch's composition. PNGs are written to a temporary name and renamed (no
  half-written image), the metadata line is appended after the image, and at the end ``metadata.jsonl`` is rewritten
  in canonical order (prompt, then sample).
* ``generation.json`` records the model, weights, prompts and sampler settings; a rerun with different settings into
  the same folder is refused (it would mix two distributions), naming the keys that differ.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.data.prompts import load_prompts
from diffalign.eval.errors import EvalFileNotFoundError, EvalInputError
from diffalign.models.diffusion import DiffusionAdapter, unwrap
from diffalign.models.rollout import SamplerSettings, build_schedule, is_flow, rollout
from diffalign.utils.images import to_uint8

METADATA = "metadata.jsonl"
SETTINGS = "generation.json"
#: noise index of sample ``s`` of prompt ``p`` is ``p * NOISE_STRIDE + s`` (so at most this many samples per prompt)
NOISE_STRIDE = 1_000_000
#: the settings that must agree between a folder's runs (the rest, e.g. batch size or device, may change)
IDENTITY_KEYS = (
    "model",
    "weights",
    "prompts",
    "seed",
    "sampler",
    "steps",
    "guidance_scale",
    "noise_level",
    "resolution",
)


@dataclass
class GenerationConfig:
    """What :func:`generate_images` samples. ``sampler`` / ``noise_level`` / ``resolution`` ``None``: ``ode`` for
    flow models and ``ddim`` otherwise / 0.7 for the flow SDEs and 0 (deterministic DDIM) for ``ddim`` / the
    denoiser's ``sample_size`` × the VAE scale factor."""

    model: str
    prompts: str
    output_dir: str
    weights: str | None = None
    n_per_prompt: int = 4
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.5
    sampler: str | None = None
    noise_level: float | None = None
    resolution: int | None = None
    batch_size: int = 8
    max_prompts: int | None = None
    device: str | None = None
    dtype: str | None = None
    max_new_images: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def noise_index(prompt_index: int, sample_index: int) -> int:
    if sample_index >= NOISE_STRIDE:
        raise EvalInputError(f"sample index {sample_index}: at most {NOISE_STRIDE} samples per prompt (--n-per-prompt)")
    return prompt_index * NOISE_STRIDE + sample_index


def image_name(prompt_index: int, sample_index: int) -> str:
    return f"p{prompt_index:05d}_s{sample_index:04d}.png"


def load_generator(
    model: str | os.PathLike, weights: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None
) -> DiffusionAdapter:
    """The backbone adapter of ``model`` (local diffusers folder or hub id), with a training run's output
    (``unet/`` / ``transformer/`` full weights or ``pytorch_lora_weights.safetensors``) applied when ``weights``
    is given (:func:`diffalign.eval.weights.load_trained_denoiser`)."""
    from diffalign.eval.weights import load_trained_denoiser
    from diffalign.models.loading import load_adapter

    adapter = load_adapter(model, torch_dtype=dtype)
    if weights is not None:
        denoiser = load_trained_denoiser(model, weights, adapter.denoiser_subfolder).eval().requires_grad_(False)
        if dtype is not None:
            denoiser = denoiser.to(dtype)
        adapter.denoiser = denoiser
    return adapter


def default_resolution(adapter: DiffusionAdapter) -> int:
    """The denoiser's ``sample_size`` (latent pixels) times the VAE scale factor."""
    size = unwrap(adapter.denoiser).config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * adapter.vae_scale_factor


def sampler_settings(adapter: DiffusionAdapter, config: GenerationConfig) -> SamplerSettings:
    kind = config.sampler or ("ode" if is_flow(adapter) else "ddim")
    level = config.noise_level
    if level is None:
        level = 0.0 if kind in ("ddim", "ode") else 0.7
    settings = SamplerSettings(
        kind=kind,
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        noise_level=level,
        resolution=config.resolution or default_resolution(adapter),
    )
    build_schedule(adapter, settings)  # fails early, naming the samplers that fit this model
    return settings


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_metadata(folder: str | os.PathLike, *, strict: bool = True) -> list[dict[str, Any]]:
    """The entries of ``folder/metadata.jsonl``. ``strict=False`` (resuming) drops a malformed last line (an
    interrupted append) instead of raising."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise EvalFileNotFoundError(f"{path} not found: {folder} is not a folder written by scripts/generate.py")
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            if not strict and number == len(lines):
                break
            raise EvalInputError(f"{path} line {number}: not valid JSON ({error})") from error
        missing = [key for key in ("file", "prompt", "prompt_index", "sample_index") if key not in entry]
        if missing:
            raise EvalInputError(f"{path} line {number}: missing key(s) {missing}")
        entries.append(entry)
    return entries


def _write_metadata(folder: Path, entries: Sequence[dict[str, Any]]) -> None:
    tmp = folder / f".{METADATA}.tmp"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    os.replace(tmp, folder / METADATA)


def _location(path: str | os.PathLike) -> str:
    """An existing local path made absolute (so a rerun from another directory matches), anything else as given."""
    return os.path.abspath(path) if os.path.exists(path) else os.fspath(path)


def _check_settings(folder: Path, identity: dict[str, Any]) -> None:
    path = folder / SETTINGS
    if not path.is_file():
        return
    previous = json.loads(path.read_text(encoding="utf-8"))
    differ = [k for k in IDENTITY_KEYS if previous.get(k) != identity.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {identity.get(k)!r}" for k in differ)
        raise EvalInputError(
            f"{folder} already holds images generated with other settings ({detail}); use another --output-dir "
            f"(or delete the folder) instead of mixing two runs"
        )


def generate_images(config: GenerationConfig, adapter: DiffusionAdapter | None = None) -> dict[str, Any]:
    """Generate (or complete) ``config.output_dir``; returns a summary (counts, seconds, settings). ``adapter``:
    an already-loaded model to use instead of loading ``config.model`` / ``config.weights``."""
    started = time.perf_counter()
    if config.n_per_prompt < 1 or config.batch_size < 1:
        raise EvalInputError(f"--n-per-prompt {config.n_per_prompt} and --batch-size {config.batch_size} must be >= 1")
    prompts = load_prompts(config.prompts, max_samples=config.max_prompts)
    if adapter is None:
        dtype = getattr(torch, config.dtype) if config.dtype else None
        adapter = load_generator(config.model, config.weights, dtype=dtype)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter.to(device)
    settings = sampler_settings(adapter, config)
    identity = {
        "model": _location(config.model),
        "weights": None if config.weights is None else _location(config.weights),
        "prompts": _location(config.prompts),
        "seed": config.seed,
        "sampler": settings.kind,
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "noise_level": settings.noise_level,
        "resolution": settings.resolution,
    }
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _check_settings(folder, identity)
    record = {**identity, "n_per_prompt": config.n_per_prompt, "n_prompts": len(prompts), **config.extra}
    (folder / SETTINGS).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    done: dict[tuple[int, int], dict[str, Any]] = {}
    if (folder / METADATA).is_file():
        for entry in read_metadata(folder, strict=False):
            p, s = int(entry["prompt_index"]), int(entry["sample_index"])
            if p < len(prompts) and entry["prompt"] == prompts[p] and (folder / entry["file"]).is_file():
                done[(p, s)] = entry
        _write_metadata(folder, [done[key] for key in sorted(done)])  # drop a cut-short line before appending
    jobs = [(p, s) for p in range(len(prompts)) for s in range(config.n_per_prompt)]
    batches = [jobs[i : i + config.batch_size] for i in range(0, len(jobs), config.batch_size)]
    todo = sum(key not in done for key in jobs)
    budget = todo if config.max_new_images is None else min(todo, config.max_new_images)
    written = 0
    bar = tqdm(total=len(jobs), initial=len(jobs) - todo, desc="generating", unit="img", disable=not config.progress)
    with open(folder / METADATA, "a", encoding="utf-8") as log:
        for batch in batches:
            missing = [key for key in batch if key not in done]
            if not missing or written >= budget:
                continue
            trajectory = rollout(
                adapter,
                [prompts[p] for p, _ in batch],
                settings,
                seed=config.seed,
                indices=[noise_index(p, s) for p, s in batch],
            )
            arrays = to_uint8(trajectory.images)
            for (p, s), array in zip(batch, arrays, strict=True):
                if (p, s) in done or written >= budget:
                    continue
                name = image_name(p, s)
                _save_png(array, folder / name)
                entry = {
                    "file": name,
                    "prompt": prompts[p],
                    "prompt_index": p,
                    "sample_index": s,
                    "seed": config.seed,
                    "noise_index": noise_index(p, s),
                }
                log.write(json.dumps(entry) + "\n")
                log.flush()
                done[(p, s)] = entry
                written += 1
                bar.update(1)
    bar.close()
    present = [done[key] for key in jobs if key in done]
    wanted = set(jobs)
    extra = [e for key, e in sorted(done.items()) if key not in wanted]  # e.g. from an earlier, larger n
    _write_metadata(folder, sorted(present + extra, key=lambda e: (e["prompt_index"], e["sample_index"])))
    seconds = time.perf_counter() - started
    return {
        "output_dir": str(folder),
        "prompts": len(prompts),
        "n_per_prompt": config.n_per_prompt,
        "images": len(present),
        "requested": len(jobs),
        "generated": written,
        "skipped": len(jobs) - todo,
        "complete": len(present) == len(jobs),
        "seconds": round(seconds, 2),
        "images_per_second": round(written / seconds, 2) if written else None,
        **{k: identity[k] for k in ("sampler", "steps", "guidance_scale", "noise_level", "resolution", "seed")},
    }
