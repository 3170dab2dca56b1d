"""Command lines of ``scripts/generate.py`` and ``scripts/evaluate.py`` (argument parsing and the printed
summary; the work is in :mod:`diffalign.eval.generation` and :mod:`diffalign.eval.evaluation`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

#: diffalign.models.sampling.SAMPLER_KINDS, copied so that --help imports no torch (a test keeps them equal)
SAMPLER_KINDS = ("sde", "cps", "dance", "ode", "ddim")


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Generate evaluation images (PNG + metadata.jsonl) from an SD 1.x/2.x, SDXL or SD3 model, "
        "resumably: a rerun skips the images already present and writes identical files.",
    )
    p.add_argument("--model", required=True, help="diffusers model folder or hub id (the base)")
    p.add_argument("--weights", help="training run folder: unet/ or transformer/ (full) or LoRA weights to apply")
    p.add_argument("--prompts", required=True, help=".txt (one prompt a line) or a dataset with a 'prompt' column")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--n-per-prompt", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="sample s of prompt p uses noise (seed, p*1e6 + s)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.5, help="classifier-free guidance (1 = off)")
    p.add_argument("--sampler", choices=SAMPLER_KINDS, help="default: ode for flow models, ddim otherwise")
    p.add_argument("--noise-level", type=float, help="SDE noise level / DDIM eta (default 0.7 for SDEs, 0 for ddim)")
    p.add_argument("--resolution", type=int, help="default: the denoiser's sample_size x the VAE scale factor")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="model dtype (default: as stored)")
    p.add_argument("--max-new-images", type=int, help="stop after writing this many new images (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def generate_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = generate_parser().parse_args(argv)
    from diffalign.eval.generation import GenerationConfig, generate_images  # after parsing: --help stays fast

    config = GenerationConfig(
        model=args.model,
        prompts=args.prompts,
        output_dir=args.output_dir,
        weights=args.weights,
        n_per_prompt=args.n_per_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        sampler=args.sampler,
        noise_level=args.noise_level,
        resolution=args.resolution,
        batch_size=args.batch_size,
        max_prompts=args.max_prompts,
        device=args.device,
        dtype=args.dtype,
        max_new_images=args.max_new_images,
        progress=not args.no_progress,
    )
    summary = generate_images(config)
    state = "complete" if summary["complete"] else f"incomplete ({summary['images']}/{summary['requested']})"
    print(
        f"{summary['output_dir']}: {state}; {summary['generated']} generated, {summary['skipped']} already present; "
        f"{summary['prompts']} prompts x {summary['n_per_prompt']} samples, {summary['sampler']} "
        f"{summary['steps']} steps, cfg {summary['guidance_scale']}, {summary['resolution']}px, seed "
        f"{summary['seed']}; {summary['seconds']} s"
    )
    print(json.dumps(summary))
    return summary


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score generated image folders with reward models, measure diversity, and compare two folders "
        "(win rate of A over B with a bootstrap interval). Writes report.md, scores.csv, grids and plots.",
    )
    p.add_argument("--images", required=True, help="folder written by scripts/generate.py (model A)")
    p.add_argument("--images-b", help="second folder (model B, same prompts and seeds) to compare against")
    p.add_argument(
        "--rewards",
        help="comma-separated reward names (clip_score, pickscore, hpsv2, aesthetic, jpeg_compressibility, toy_gold, "
        "toy_reward_model); default: toy_gold for toy prompts, else none (diversity only)",
    )
    p.add_argument(
        "--reward-options",
        default="{}",
        help="JSON {reward: {option: value}}, e.g. "
        '\'{"clip_score": {"model": "/path/clip", "local_files_only": true}}\'',
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the prompts (0: no interval)")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=64, help="images per reward forward")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-figures", action="store_true", help="skip grids and plots")
    p.add_argument("--output-dir", required=True)
    return p


def evaluate_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    import torch  # after parsing: --help stays fast

    from diffalign.eval.evaluation import evaluate_folders
    from diffalign.eval.scoring import parse_reward_names

    try:
        options = json.loads(args.reward_options)
    except json.JSONDecodeError as error:
        parser.error(f"--reward-options is not valid JSON: {error}")
    if not isinstance(options, dict):
        parser.error("--reward-options must be a JSON object {reward: {option: value}}")
    summary = evaluate_folders(
        args.images,
        args.output_dir,
        images_b=args.images_b,
        rewards=None if args.rewards is None else parse_reward_names(args.rewards),
        reward_options=options,
        n_bootstrap=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed,
        confidence=args.confidence,
        batch_size=args.batch_size,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        figures=not args.no_figures,
    )
    for label, model in summary["models"].items():
        scores = ", ".join(f"{k} {v['mean']:.4f}" for k, v in model["scores"].items())
        diversity = ", ".join(f"{k} {v:.4f}" for k, v in model["diversity"].items())
        print(f"{label} {model['folder']}: {model['images']} images; {scores}; {diversity}")
    for name, w in summary.get("win_rates", {}).items():
        interval = "" if w["low"] is None else f" [{w['low']:.4f}, {w['high']:.4f}]"
        print(f"win rate A over B ({name}): {w['estimate']:.4f}{interval}")
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")
    print(f"report: {args.output_dir}/report.md")
    return summary
