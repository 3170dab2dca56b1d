"""Rollout with log-probs vs diffusers' plain pipeline sampling: same model, steps, batch, guidance and resolution.

Issue target: ``rollout(...)`` (every latent, per-step log-probs, optionally the means, decoded images) takes at most
1.10x the time of the diffusers pipeline's ``__call__`` that only samples. For each backbone one randomly initialised
model is built from configs (no downloads) and both sides run with it:

* SD3 (``SD3Transformer2DModel`` + VAE + two CLIP text encoders, ``FlowMatchEulerDiscreteScheduler``):
  ``StableDiffusion3Pipeline`` vs ``rollout(kind="sde", noise_level=0.7)`` and the same with ``keep_means=True``
  (what GRPO-Guard needs);
* SD (``UNet2DConditionModel`` + VAE + CLIP, ``DDIMScheduler``): ``StableDiffusionPipeline(eta=1.0)`` vs
  ``rollout(kind="ddim", noise_level=1.0)``;
* FLUX.1-dev (``FluxTransformer2DModel`` with the guidance embedding + VAE + CLIP + T5, dynamically shifted
  ``FlowMatchEulerDiscreteScheduler``): ``FluxPipeline`` (guidance embedding ``--flux-guidance``, no CFG) vs
  ``rollout(kind="sde", noise_level=0.7)``, the pipeline given the rollout's initial latents packed as it packs them.
  Target for FLUX: 1.05x.

Both sides include prompt encoding (with the empty negative prompt of classifier-free guidance) and the VAE decode;
the pipeline gets the initial latents the rollout draws (so both denoise the same samples) and ``output_type="pt"``.
Every call is timed as a whole with ``time.perf_counter``; after one warm-up call of each side the measured calls are
interleaved (the order alternates each repeat) and the medians are compared: ``ratio = ours / diffusers``.
The last line printed is a JSON object with every number. ``--tiny`` is a seconds-long smoke run for CI.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

TARGET_RATIO = 1.10
TARGETS = {"sd3": TARGET_RATIO, "sd": TARGET_RATIO, "flux": 1.05}  # ours / diffusers, per backbone
PROMPTS = ("a red circle", "a blue square", "a green triangle on grass", "two yellow stars", "a cat", "a dog")


# ------------------------------------------------------------------------------------------------------------ models


def _n_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_sd3(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny SD3 components (:func:`tiny_sd3_components`) with a transformer sized by the CLI flags."""
    from diffusers import SD3Transformer2DModel

    from diffalign.models.tiny_sd3 import tiny_sd3_components

    c = tiny_sd3_components(sample_size=args.resolution, seed=args.seed)
    latent = args.resolution // 2  # the tiny VAE has two levels: downsampling by 2
    width = args.sd3_heads * args.sd3_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 11)
        c["transformer"] = SD3Transformer2DModel(
            sample_size=latent,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=args.sd3_layers,
            attention_head_dim=args.sd3_head_dim,
            num_attention_heads=args.sd3_heads,
            caption_projection_dim=width,
            joint_attention_dim=64,  # the two tiny CLIPs' 32 + 32
            pooled_projection_dim=64,
            pos_embed_max_size=max(32, latent // 2),
        ).eval()
    return c


def build_sd(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny SD components (:func:`tiny_sd_components`) with a UNet sized by the CLI flags."""
    from diffalign.models.tiny import tiny_sd_components

    channels = tuple(int(x) for x in args.sd_channels.split(","))
    return tiny_sd_components(
        sample_size=args.resolution,
        seed=args.seed,
        block_out_channels=channels,
        layers_per_block=args.sd_layers,
    )


def _batch(adapter: Any, args: argparse.Namespace) -> tuple[list[str], list[int], tuple[int, ...], torch.Tensor]:
    """The timed batch: ``args.batch`` prompts cycling :data:`PROMPTS`, their indices, the latent shape and the
    initial noise the rollout draws (handed to the diffusers pipeline as its ``latents``)."""
    from diffalign.utils.randomness import NOISE, per_sample_normal

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    indices = list(range(args.batch))
    shape = adapter.latent_shape(args.resolution, args.resolution)
    return prompts, indices, shape, per_sample_normal(shape, args.seed, 0, indices, NOISE)


def _pipeline_side(
    pipe: Any,
    prompts: list[str],
    latents: torch.Tensor,
    args: argparse.Namespace,
    *,
    seeded: bool,
    guidance: float | None = None,
    **extra: Any,
) -> Callable[[], Any]:
    """The diffusers side: ``pipe`` on ``prompts`` from ``latents`` with the benchmark's steps, guidance (``guidance``
    when given: FLUX's embedding) and resolution, images as tensors; ``seeded`` hands each call a fresh generator
    seeded ``args.seed``; ``extra`` are the pipeline's own keywords."""

    def run() -> Any:
        generator = {"generator": torch.Generator().manual_seed(args.seed)} if seeded else {}
        return pipe(
            prompts,
            latents=latents.clone(),
            num_inference_steps=args.steps,
            guidance_scale=args.guidance if guidance is None else guidance,
            height=args.resolution,
            width=args.resolution,
            output_type="pt",
            **extra,
            **generator,
        ).images

    return run


def sd3_sides(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    from diffusers import StableDiffusion3Pipeline

    from diffalign.models.rollout import SamplerSettings, rollout
    from diffalign.models.sd3 import SD3Adapter

    c = build_sd3(args)
    adapter = SD3Adapter(
        c["transformer"],
        c["scheduler"],
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"],
        tokenizer_2=c["tokenizer_2"],
        max_sequence_length=77,
    )
    pipe = StableDiffusion3Pipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    prompts, indices, shape, latents = _batch(adapter, args)
    settings = SamplerSettings("sde", args.steps, args.guidance, 0.7, args.resolution)
    diffusers_side = _pipeline_side(pipe, prompts, latents, args, seeded=False, max_sequence_length=77)

    def ours(keep_means: bool) -> Callable[[], Any]:
        return lambda: rollout(adapter, prompts, settings, seed=args.seed, indices=indices, keep_means=keep_means)

    sizes = {
        "transformer_params": _n_params(c["transformer"]),
        "vae_params": _n_params(c["vae"]),
        "text_encoder_params": _n_params(c["text_encoder"]) + _n_params(c["text_encoder_2"]),
        "latent_shape": list(shape),
        "layers": args.sd3_layers,
        "width": args.sd3_heads * args.sd3_head_dim,
    }
    return {"diffusers": diffusers_side, "ours": ours(False), "ours_keep_means": ours(True)}, sizes


def sd_sides(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffalign.models.diffusion import SDAdapter
    from diffalign.models.rollout import SamplerSettings, rollout

    c = build_sd(args)
    adapter = SDAdapter(
        c["unet"], c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"]
    )
    pipe = StableDiffusionPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["unet"],
        scheduler=DDIMScheduler.from_config(c["scheduler"].config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts, indices, shape, latents = _batch(adapter, args)
    settings = SamplerSettings("ddim", args.steps, args.guidance, 1.0, args.resolution)
    diffusers_side = _pipeline_side(pipe, prompts, latents, args, seeded=True, eta=1.0)

    def ours() -> Any:
        return rollout(adapter, prompts, settings, seed=args.seed, indices=indices)

    sizes = {
        "unet_params": _n_params(c["unet"]),
        "vae_params": _n_params(c["vae"]),
        "text_encoder_params": _n_params(c["text_encoder"]),
        "latent_shape": list(shape),
        "channels": list(c["unet"].config.block_out_channels),
        "layers_per_block": args.sd_layers,
    }
    return {"diffusers": diffusers_side, "ours": ours}, sizes


def build_flux(args: argparse.Namespace) -> dict[str, Any]:
    """Tiny FLUX.1-dev components (:func:`tiny_flux_components`) with a transformer sized by the CLI flags."""
    from diffusers import FluxTransformer2DModel

    from diffalign.models.tiny_flux import tiny_flux_components

    c = tiny_flux_components(sample_size=args.resolution, seed=args.seed, max_sequence_length=args.flux_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 11)
        c["transformer"] = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=args.flux_layers,
            num_single_layers=args.flux_single_layers,
            attention_head_dim=args.flux_head_dim,
            num_attention_heads=args.flux_heads,
            joint_attention_dim=32,  # the tiny T5's width
            pooled_projection_dim=32,  # the tiny CLIP's width
            guidance_embeds=True,
            axes_dims_rope=(args.flux_head_dim // 4, args.flux_head_dim // 4, args.flux_head_dim // 2),
        ).eval()
    return c


def flux_sides(args: argparse.Namespace) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    from diffusers import FluxPipeline

    from diffalign.models.flux import FluxAdapter
    from diffalign.models.rollout import SamplerSettings, rollout

    c = build_flux(args)
    adapter = FluxAdapter(
        c["transformer"],
        c["scheduler"],
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer_2=c["tokenizer_2"],
        max_sequence_length=args.flux_tokens,
        guidance=args.flux_guidance,
    )
    pipe = FluxPipeline(**c)
    pipe.set_progress_bar_config(disable=True)
    prompts, indices, shape, latents = _batch(adapter, args)
    packed = FluxPipeline._pack_latents(latents, len(prompts), *shape)
    settings = SamplerSettings("sde", args.steps, 1.0, 0.7, args.resolution)  # guidance is the embedding, not CFG
    diffusers_side = _pipeline_side(
        pipe, prompts, packed, args, seeded=False, guidance=args.flux_guidance, max_sequence_length=args.flux_tokens
    )

    def ours() -> Any:
        return rollout(adapter, prompts, settings, seed=args.seed, indices=indices)

    sizes = {
        "transformer_params": _n_params(c["transformer"]),
        "vae_params": _n_params(c["vae"]),
        "text_encoder_params": _n_params(c["text_encoder"]) + _n_params(c["text_encoder_2"]),
        "latent_shape": list(shape),
        "layers": [args.flux_layers, args.flux_single_layers],
        "width": args.flux_heads * args.flux_head_dim,
    }
    return {"diffusers": diffusers_side, "ours": ours}, sizes


BACKBONES = {"sd3": sd3_sides, "sd": sd_sides, "flux": flux_sides}


# ------------------------------------------------------------------------------------------------------------ timing


def time_sides(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """``warmup`` untimed calls of each side, then ``repeats`` timed rounds; the order rotates every round."""
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for name in order:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for backbone in args.backbones:
        sides, sizes = BACKBONES[backbone](args)
        times = time_sides(sides, args.repeats, args.warmup)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        base = medians["diffusers"]
        ratios = {name: medians[name] / base for name in medians if name != "diffusers"}
        results[backbone] = {
            "model": sizes,
            "times_s": times,
            "median_s": medians,
            "ratios": ratios,
            "target_ratio": TARGETS[backbone],
            "meets_target": {name: ratio <= TARGETS[backbone] for name, ratio in ratios.items()},
        }
    return {
        "target_ratio": TARGET_RATIO,
        "target_ratios": {b: TARGETS[b] for b in args.backbones},
        "settings": {
            "steps": args.steps,
            "batch": args.batch,
            "guidance_scale": args.guidance,
            "resolution": args.resolution,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "tiny": args.tiny,
            "torch": torch.__version__,
        },
        "backbones": results,
        "bench_wall_s": time.perf_counter() - started,
    }


def report(s: dict[str, Any]) -> None:
    from diffalign.utils.benchmark import format_table

    st = s["settings"]
    print(
        f"settings: steps={st['steps']} batch={st['batch']} guidance={st['guidance_scale']} "
        f"resolution={st['resolution']} repeats={st['repeats']} warmup={st['warmup']} threads={st['threads']}"
    )
    rows = []
    for backbone, r in s["backbones"].items():
        print(f"{backbone}: " + " ".join(f"{k}={v}" for k, v in r["model"].items()))
        for name, median in r["median_s"].items():
            ratio = r["ratios"].get(name)
            rows.append(
                [
                    backbone,
                    name,
                    f"{median:.4f}",
                    " ".join(f"{t:.4f}" for t in r["times_s"][name]),
                    "-" if ratio is None else f"{ratio:.3f}",
                    "-" if ratio is None else f"{r['target_ratio']}",
                    "-" if ratio is None else ("yes" if ratio <= r["target_ratio"] else "NO"),
                ]
            )
    print(format_table(["backbone", "side", "median_s", "times_s", "ratio", "target", "met"], rows))
    print(f"bench_wall_s={s['bench_wall_s']:.1f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbones", default="sd3,sd,flux", help="comma-separated subset of sd3,sd,flux (default all)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    p.add_argument("--batch", type=int, default=4, help="prompts per call (default 4)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale (default 4.5)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels; latents are half (default 64)")
    p.add_argument("--sd3-layers", type=int, default=4, help="SD3 transformer layers (default 4)")
    p.add_argument("--sd3-heads", type=int, default=4, help="SD3 attention heads (default 4)")
    p.add_argument("--sd3-head-dim", type=int, default=32, help="SD3 attention head width (default 32)")
    p.add_argument("--sd-channels", default="64,128", help="SD UNet block_out_channels (default 64,128)")
    p.add_argument("--sd-layers", type=int, default=2, help="SD UNet layers per block (default 2)")
    p.add_argument("--flux-layers", type=int, default=2, help="FLUX double-stream blocks (default 2)")
    p.add_argument("--flux-single-layers", type=int, default=4, help="FLUX single-stream blocks (default 4)")
    p.add_argument("--flux-heads", type=int, default=4, help="FLUX attention heads (default 4)")
    p.add_argument("--flux-head-dim", type=int, default=32, help="FLUX attention head width (default 32)")
    p.add_argument("--flux-tokens", type=int, default=64, help="FLUX T5 tokens (default 64)")
    p.add_argument("--flux-guidance", type=float, default=3.5, help="FLUX-dev guidance embedding (default 3.5)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each side, interleaved (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (CI): toy sizes, 2 steps, 1 repeat")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = set(args.backbones) - set(BACKBONES)
    if unknown or not args.backbones:
        p.error(f"--backbones: expected a subset of {sorted(BACKBONES)}, got {args.backbones}")
    if args.tiny:
        args.steps, args.batch, args.resolution, args.repeats, args.warmup = 2, 2, 32, 1, 1
        args.sd3_layers, args.sd3_heads, args.sd3_head_dim = 1, 2, 8
        args.sd_channels, args.sd_layers = "32,64", 1
        args.flux_layers, args.flux_single_layers, args.flux_heads, args.flux_head_dim, args.flux_tokens = (
            1,
            1,
            2,
            16,
            16,
        )
    if args.steps < 1 or args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.resolution % 4:
        p.error("need --steps, --batch, --repeats >= 1, --warmup >= 0 and --resolution a multiple of 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = bench(args)
    report(summary)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    ok = all(
        math.isfinite(x) and x > 0 for r in summary["backbones"].values() for x in r["ratios"].values()
    )  # the speed itself is reported, not asserted
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
