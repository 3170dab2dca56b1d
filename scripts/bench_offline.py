"""Benchmark Diffusion-DPO LoRA training: pairs/s and peak RSS of diffalign's offline trainer, with and without the
latent / text-embedding cache, against diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
and against a bare training loop on tensors already in memory (the floor no data pipeline can beat).

Usage::

    python scripts/bench_offline.py --quick                                   # smoke run, a few minutes on CPU
    python scripts/bench_offline.py --diffusers-script PATH/train_diffusion_dpo.py --threads 1 --num-workers 1
    python scripts/bench_offline.py --parity-only --diffusers-script PATH      # one run each: losses, no timings

diffusers' script is not in the pip package. Get it with
``git clone --depth 1 https://github.com/huggingface/diffusers`` and pass
``--diffusers-script diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (or set
``DIFFUSERS_DPO_SCRIPT``); without it diffalign and the floor are measured. Its imports need ``torchvision``; it
imports ``wandb`` unconditionally but uses it only for validation images, so when wandb is not installed a stub module
(on the PYTHONPATH of that subprocess only) lets the unmodified script start. ``--report_to tensorboard`` is passed
(the script's default); accelerate drops it silently when tensorboard is not installed, and when it is installed
diffalign logs to tensorboard too, so both pay the same tracker cost.

Set-up (seeded, written under ``--work-dir`` and reused from there): one tiny SD pipeline WITH a VAE
(``diffalign.models.tiny``; image side ``--resolution``; ``--vae-levels`` 4, the default, is SD's VAE shape: latents
at an eighth of it, two ResNet layers per level; 2 gives latents at half), so "without the cache" runs the VAE and
the text encoder every step as diffusers does, and a Pick-a-Pic-layout parquet of ``--pairs`` pairs. ``--images
drawn-jpeg`` (the default) stores what Pick-a-Pic stores: JPEGs (quality 90) of smooth gradients, blurred shapes and
mild noise, each pair ``W x H`` with both sides drawn in ``--image-sizes`` (default 512..768 px, multiples of 8), and
captions of 6-20 words; ``--images noise-png`` stores the earlier uniform-noise PNGs (slow to decode, big).
``--image-size S`` stores every image at ``S x S``.

Contenders, all at the same batch, resolution, LoRA rank (alpha = rank, q/k/v/out, gaussian init), optimizer (AdamW,
lr 1e-5, weight decay 1e-2, constant, gradient clipping at 1), fp32, beta (diffusers' 2500 = our 5000, its logit has
no 1/2), hflip on, one process, the same ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` and ``--num-workers`` DataLoader
workers (ours: ``data.num_workers``, diffusers: ``--dataloader_num_workers``); the reference is the UNet with LoRA
adapters disabled in all of them:

* ``ours_cached``: ``scripts/train.py ... data.cache_dir=...``; the one-off cache build happens in the priming run
  and is excluded from the timing.
* ``floor``: this script's ``--worker floor``: a bare loop that loads the UNet with ``from_pretrained``, attaches the
  same peft LoRA after the same ``set_seed``, reads ``ours_cached``'s cache once, builds every step's model inputs
  (noisy latents, timesteps, text embeddings, targets: the same rows, flips, noise and timesteps as ours) into memory
  BEFORE its loop, and then per step runs only: policy forward of the 2B rows, fp32 MSE, reference forward (adapters
  disabled by peft's layer flag) under no_grad, the Diffusion-DPO loss, backward, ``clip_grad_norm_``, AdamW step,
  ``zero_grad``. It prepares ``--long-steps`` batches in every run so that its set-up cancels in the difference.
* ``ours_uncached``: ``scripts/train.py ...`` decoding, resizing and encoding images and prompts every step.
* ``diffusers``: ``python train_diffusion_dpo.py ...``.

Method: every contender first runs ``--prime-steps`` once (cache build, ``datasets`` arrow cache, page cache). Then
each runs ``--short-steps`` and ``--long-steps`` steps in fresh subprocesses, ``--repeats`` times, contenders
interleaved so that drifting load on a shared machine hits all of them alike. Seconds per step are ``(min t(long) -
min t(short)) / (long - short)`` of whole-process wall times (other load only ever adds time, so the fastest repeat is
the least disturbed; ``--statistic median`` takes the medians, and the other statistic's value is printed too):
start-up, model loading and the final save cancel, and no contender is instrumented. pairs/s = batch / (seconds per
step). The same difference of the runs' CPU times (user + system, DataLoader workers included) is printed as CPU
ms/step: the work per step, which other load on a shared machine inflates far less than wall time (with workers it is
not a throughput). Peak RSS is the larger of the kernel high-water mark of the main process and the psutil-sampled
peak of the main process's RSS plus each DataLoader worker's USS (a forked worker's RSS would count its parent's pages
again) over a contender's timed runs; see ``diffalign.utils.benchmark``. For diffalign and the floor the mean
in-process step time over the steps after ``--short-steps`` is printed as a cross-check (ours: ``step_time_s`` of
``metrics.jsonl``, from fetching the batch to the metric reduction; floor: its loop body).

Loss parity (checked on the first long run of each contender, and all that ``--parity-only`` does): ``ours_cached``
and ``floor`` run the same computation from the same weights on the same batches, so their per-step losses must agree
to float rounding (``FLOOR_LOSS_ATOL``); ``ours_uncached``'s difference to the floor is printed (it re-encodes with
other VAE batch sizes, which rounds differently; beta 5000 amplifies that). diffusers draws its own noise, timesteps
and order, so its losses cannot be compared step by step; its saved LoRA is compared with ours instead: the same keys
and shapes (rank, targets), the same initial ``lora_A`` (after N AdamW steps of lr 1e-5 each side is within
``ADAM_STEP_BOUND · lr · N`` of it, while another init differs by its std, 1/rank) and ``lora_B`` (zero at
initialisation) of the same size on both sides (same lr and optimizer). Exit status 1 if a check fails.

Output: a table, then ``key=value`` lines, among them ``cached_vs_floor_step_time_ratio``,
``uncached_vs_diffusers_pairs_per_s_ratio``, ``uncached_vs_diffusers_peak_rss_ratio``,
``cached_vs_diffusers_pairs_per_s_ratio`` and ``cached_vs_diffusers_peak_rss_ratio`` (targets in ``TARGETS``).

``--full-ft`` measures something else: full-fine-tune training on cached latents (fp32, same seed, same model,
optimizer and batch) of Diffusion-DPO with the reference as a frozen copy of the UNet
(``train.reference=frozen_copy``), of DPO with precomputed reference log-likelihoods (``train.reference=precomputed``)
and of SFT on the winners (``train.method=sft``: no reference at all, the memory floor of "no second network"), plus,
to find where any difference between precomputed DPO and SFT goes, SFT at twice the batch (``sft_2x``: as many images
per forward as DPO's 2B rows) and frozen copy, precomputed and SFT again with glibc's mmap threshold fixed
(``--mmap-threshold``, default 128 KiB; see ``MMAP_KINDS``). The tiny pipeline's UNet is made big enough
(``--unet-channels``, default 256,512: 89M parameters) for the UNet and its optimizer state to dominate RSS. Each run
of the precomputed contender starts from an empty reference store, so its precompute pass is inside the measured
process. Same method as above (priming run, short and long runs in fresh subprocesses, peak RSS over the timed runs);
``--optimizers adamw adafactor`` measures each optimizer. It prints peak RSS, per-step times (whole process, which
includes the precompute pass, and in-process training steps), both DPO loss curves and whether they match (max
|difference| <= 1e-6; exit status 1 if not), and ends with ``precomputed_vs_copy_peak_rss_ratio=R`` and
``precomputed_vs_sft_peak_rss_ratio=R`` (first optimizer, default allocator)::

    python scripts/bench_offline.py --full-ft --optimizers adamw adafactor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/bench_offline.py` without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from diffalign.utils.benchmark import ProcessRun, format_table, per_step_seconds, run_measured  # noqa: E402

DIFFUSERS_SCRIPT_ENV = "DIFFUSERS_DPO_SCRIPT"
DIFFUSERS_SCRIPT_HINT = (
    "diffusers' train_diffusion_dpo.py is not part of the diffusers pip package. To compare against it:\n"
    "    git clone --depth 1 https://github.com/huggingface/diffusers\n"
    "    python scripts/bench_offline.py --diffusers-script "
    "diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py\n"
    f"(or set {DIFFUSERS_SCRIPT_ENV}). Its imports also need torchvision."
)
NEVER = 10**9  # a checkpointing interval no run reaches
OURS_BETA, DIFFUSERS_BETA = 5000, 2500  # the same loss: diffusers' logit lacks Diffusion-DPO's factor 1/2
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 1e-2
MAX_GRAD_NORM = 1.0
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TARGETS = {  # the issues' targets, at equal batch, resolution, LoRA rank and DataLoader workers
    "cached_vs_floor_step_time_ratio": ("<=", 1.10),
    "uncached_vs_diffusers_pairs_per_s_ratio": (">=", 1.2),
    "uncached_vs_diffusers_peak_rss_ratio": ("<=", 1.0),
    "cached_vs_diffusers_pairs_per_s_ratio": (">=", 3.0),
}
FULL_FT_TARGETS = {"precomputed_vs_sft_peak_rss_ratio": ("<=", 1.03)}
# Per-step |loss(ours_cached) - loss(floor)|: both run the same float32 operations in the same order from the same
# weights on the same tensors, so they agree bit for bit on one CPU thread (measured: 0.0 over 110 steps; see
# tests/test_bench_offline.py); the bound leaves room for a BLAS that rounds differently between two processes.
FLOOR_LOSS_ATOL = 1e-6
# AdamW moves a weight by at most lr * |m_hat| / (sqrt(v_hat) + eps) per step, which is <= (1 - beta1) / sqrt(1 -
# beta2) = 3.2 lr in the worst case (lr at the first step); weight decay adds lr * 1e-2 * |w|.
ADAM_STEP_BOUND = 3.3
# --full-ft: unless given on the command line (a small model whose UNet + optimizer state dominate RSS; the latent
# size of the earlier measurements: resolution 32, 2-level VAE)
FULL_FT_DEFAULTS = {
    "pairs": 32,
    "batch_size": 2,
    "short_steps": 2,
    "long_steps": 6,
    "repeats": 1,
    "resolution": 32,
    "vae_levels": 2,
}
FULL_FT_LOSS_ATOL = 1e-6
WANDB_STUB = '''"""Stub written by diffalign's scripts/bench_offline.py: diffusers' train_diffusion_dpo.py
imports wandb at the top but uses it only to log validation images, which the benchmark never runs.
Any use fails loudly."""


def __getattr__(name):
    raise AttributeError(f"wandb is not installed (benchmark stub); wandb.{name} is unavailable")
'''
CAPTION_WORDS = (
    "a an the portrait painting photo of red blue golden small giant ancient futuristic cat dog fox dragon robot "
    "castle forest city river mountain ocean street garden at night sunset dawn in snow rain fog with glowing "
    "lights neon trees flowers stars highly detailed cinematic lighting watercolor oil digital art 4k trending "
    "artstation studio ghibli style sharp focus soft colors"
).split()


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


# -------------------------------------------------------------------------------------------------------- set-up


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Diffusion-DPO LoRA pairs/s and peak RSS: diffalign (cached, uncached) vs diffusers' script and a "
        "bare in-memory loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--diffusers-script",
        default=os.environ.get(DIFFUSERS_SCRIPT_ENV),
        help=f"path of diffusers' train_diffusion_dpo.py (default: ${DIFFUSERS_SCRIPT_ENV})",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few pairs and steps, one repeat")
    parser.add_argument(
        "--parity-only", action="store_true", help="run each contender once for --long-steps steps: losses, no timings"
    )
    parser.add_argument("--work-dir", help="folder for model, data, caches and logs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (always kept with --work-dir)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every contender")
    parser.add_argument("--resolution", type=int, default=64, help="training image side")
    parser.add_argument(
        "--vae-levels",
        type=int,
        default=4,
        choices=(2, 3, 4),
        help="VAE levels: latents at resolution / 2**(levels-1); 4 = SD-shaped (factor 8, 2 layers per level)",
    )
    parser.add_argument(
        "--images",
        choices=("drawn-jpeg", "noise-png"),
        default="drawn-jpeg",
        help="stored images: Pick-a-Pic-like JPEGs (gradients, shapes, mild noise; quality 90) or uniform-noise PNGs",
    )
    parser.add_argument(
        "--image-sizes",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="each pair's width and height are drawn in MIN..MAX (default: 512 768 for drawn-jpeg, else --resolution)",
    )
    parser.add_argument("--image-size", type=int, help="store every image at this side (overrides --image-sizes)")
    parser.add_argument("--pairs", type=int, default=256, help="preference pairs in the parquet")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader workers: data.num_workers of ours, --dataloader_num_workers of diffusers' script",
    )
    parser.add_argument(
        "--device", choices=("cpu", "auto"), default="cpu", help="cpu hides GPUs; auto lets accelerate choose"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prime-steps", type=int, default=1, help="steps of the untimed priming run")
    parser.add_argument("--short-steps", type=int, default=10)
    parser.add_argument("--long-steps", type=int, default=110)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender and step count")
    parser.add_argument(
        "--statistic",
        choices=("min", "median"),
        default="min",
        help="which run of each step count's repeats the per-step difference uses (the fastest: least disturbed by "
        "other load; or the median)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before one run is killed")
    parser.add_argument("--json", help="also write the results to this JSON file")
    full = parser.add_argument_group(
        "full fine-tune reference memory (--full-ft)",
        "Full-fine-tune Diffusion-DPO with a frozen reference copy vs precomputed reference log-likelihoods vs SFT; "
        f"unless given, --full-ft uses {FULL_FT_DEFAULTS} (--quick: UNet channels 128,256)",
    )
    full.add_argument(
        "--full-ft", action="store_true", help="measure peak RSS: frozen copy vs precomputed reference vs SFT"
    )
    full.add_argument(
        "--unet-channels", default="256,512", help="UNet block_out_channels of the --full-ft model (two levels)"
    )
    full.add_argument("--unet-layers", type=int, default=2, help="UNet layers_per_block of the --full-ft model")
    full.add_argument(
        "--optimizers",
        nargs="+",
        default=["adamw"],
        choices=("adamw", "adafactor", "adamw_8bit"),
        help="--full-ft: measure each; the last output lines are the first one's ratios",
    )
    full.add_argument("--no-sft-2x", action="store_true", help="--full-ft: skip the SFT run at twice the batch")
    full.add_argument(
        "--mmap-threshold",
        type=int,
        default=131072,
        help="--full-ft: also run frozen copy, precomputed and SFT with MALLOC_MMAP_THRESHOLD_ fixed at this many "
        "bytes (glibc's initial value; 0: skip)",
    )
    # internal: the subprocesses this script starts
    parser.add_argument("--worker", choices=("prepare", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    if args.full_ft:
        for name, value in FULL_FT_DEFAULTS.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
        if args.quick:
            args.unet_channels = "128,256"
    if args.quick and not args.full_ft:
        quick = {"pairs": 32, "batch_size": 2, "short_steps": 2, "long_steps": 12, "repeats": 1}
        for name, value in quick.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    if args.image_size is not None:
        args.image_sizes = [args.image_size, args.image_size]
    elif args.image_sizes is None:
        args.image_sizes = [512, 768] if args.images == "drawn-jpeg" else [args.resolution, args.resolution]
    factor = 2 ** (args.vae_levels - 1)
    if args.resolution % factor or args.resolution // factor < 4:
        parser.error(f"--resolution {args.resolution}: use a multiple of {factor} giving latents of at least 4 px")
    low, high = args.image_sizes
    if not args.resolution <= low <= high:
        parser.error(f"--image-sizes {low} {high}: need --resolution {args.resolution} <= MIN <= MAX")
    if args.prime_steps < 1:
        parser.error(f"--prime-steps {args.prime_steps}: must be >= 1")
    if not 1 <= args.short_steps < args.long_steps:
        parser.error(f"need 1 <= --short-steps < --long-steps, got {args.short_steps} and {args.long_steps}")
    if args.pairs < args.batch_size * (2 if args.full_ft and not args.no_sft_2x else 1):
        parser.error(f"--pairs {args.pairs} is smaller than one batch of {args.batch_size} (--full-ft: two)")
    if args.repeats < 1 or args.threads < 1 or args.rank < 1:
        parser.error("--repeats, --threads and --rank must be >= 1")
    if args.num_workers < 0:
        parser.error(f"--num-workers {args.num_workers}: must be >= 0")
    return args


def draw_image(rng: Any, width: int, height: int) -> Any:
    """A Pick-a-Pic-like RGB image (PIL): a smooth four-corner colour gradient, 3-8 filled ellipses, rectangles and
    polygons, a Gaussian blur (radius 1-3 px, soft edges as in rendered images) and mild pixel noise (sigma 3)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    c = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    background = (1 - y) * ((1 - x) * c[0] + x * c[1]) + y * ((1 - x) * c[2] + x * c[3])
    img = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            radii = rng.uniform(0.5, 1.0, angles.size)
            points = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]
            draw.polygon(points, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 3.0))))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")


def make_pickapic_like_rows(n: int, sizes: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """``n`` rows for ``write_pickapic_parquet``: two :func:`draw_image` JPEGs (quality 90) of one size per pair,
    both sides drawn in ``sizes`` (multiples of 8 where the range allows), a caption of 6-20 words, labels
    alternating (1, 0) / (0, 1) (odd rows are swapped on load), no ties."""
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    low, high = sizes
    choices = np.arange(low + (-low) % 8, high + 1, 8) if high - low >= 8 else np.arange(low, high + 1)
    rows = []
    for i in range(n):
        width, height = (int(v) for v in rng.choice(choices, 2))
        cells = []
        for _ in range(2):
            buf = io.BytesIO()
            draw_image(rng, width, height).save(buf, format="JPEG", quality=90)
            cells.append(buf.getvalue())
        words = rng.choice(CAPTION_WORDS, int(rng.integers(6, 21)))
        rows.append(
            {
                "jpg_0": cells[0],
                "jpg_1": cells[1],
                "label_0": 1.0 if i % 2 == 0 else 0.0,
                "label_1": 0.0 if i % 2 == 0 else 1.0,
                "caption": " ".join(str(w) for w in words),
            }
        )
    return rows


def prepare_worker(spec: dict[str, Any]) -> None:
    """Write the tiny SD pipeline and / or the parquet ``spec`` asks for (run as ``--worker prepare``)."""
    from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
    from diffalign.models.tiny import save_tiny_sd_pipeline

    if spec["model_dir"]:
        unet = {}
        if spec.get("unet_channels"):
            unet = {"block_out_channels": tuple(spec["unet_channels"]), "layers_per_block": spec["unet_layers"]}
        save_tiny_sd_pipeline(
            spec["model_dir"],
            with_vae=True,
            sample_size=spec["resolution"],
            seed=spec["seed"],
            vae_block_out_channels=tuple(spec["vae_channels"]),
            vae_layers_per_block=spec["vae_layers"],
            **unet,
        )
    if spec["parquet"]:
        sizes = tuple(spec["image_sizes"])
        if spec["images"] == "drawn-jpeg":
            rows = make_pickapic_like_rows(spec["pairs"], sizes, spec["seed"])
        else:  # noise-png: the earlier assets (square images of the smaller side)
            rows = make_random_pairs(spec["pairs"], size=sizes[0], seed=spec["seed"])
        write_pickapic_parquet(spec["parquet"], rows)


def prepare_assets(s: Settings, unet_channels: Sequence[int] | None = None, unet_layers: int = 2) -> tuple[Path, Path]:
    """Write the tiny SD pipeline (with VAE) and the parquet (``<data folder>/train.parquet``); return both folders.

    Folder names record what shapes them (resolution and VAE levels; UNet size for --full-ft; image style, sizes,
    pair count and seed), so one ``--work-dir`` serves several settings. Built in a subprocess: on Linux a child's
    ``ru_maxrss`` includes the peak of the process it was forked from, so the measuring process must stay small or
    every contender would report at least its size.
    """
    model_dir = s.work_dir / f"model_r{s.resolution}_vae{s.vae_levels}_s{s.seed}"
    if unet_channels:
        model_dir = model_dir.with_name(f"{model_dir.name}_unet{'-'.join(map(str, unet_channels))}x{unet_layers}")
    data_dir = s.work_dir / f"data_{s.images}_{s.image_min}-{s.image_max}_{s.pairs}p_s{s.seed}"
    parquet = data_dir / "train.parquet"
    spec = {
        "model_dir": None if (model_dir / "model_index.json").is_file() else str(model_dir),
        "parquet": None if parquet.is_file() else str(parquet),
        "resolution": s.resolution,
        "images": s.images,
        "image_sizes": [s.image_min, s.image_max],
        "pairs": s.pairs,
        "seed": s.seed,
        "vae_channels": [32, 64, 64, 64][: s.vae_levels],
        "vae_layers": 2 if s.vae_levels == 4 else 1,  # SD's VAE: layers_per_block 2
        "unet_channels": list(unet_channels) if unet_channels else None,
        "unet_layers": unet_layers,
    }
    if spec["model_dir"] or spec["parquet"]:
        spec_path = s.work_dir / "prepare.json"
        spec_path.write_text(json.dumps(spec))
        env = base_env(s)
        _prepend_path(env, "PYTHONPATH", REPO_ROOT)
        subprocess.run([s.python, str(Path(__file__).resolve()), "--worker", "prepare", "--spec", str(spec_path)],
                       check=True, env=env)  # fmt: skip
    return model_dir, data_dir


def probe_python(python: str) -> dict[str, bool]:
    """Which optional packages the contenders' interpreter has (wandb, torchvision, a tensorboard for accelerate)."""
    code = (
        "import importlib.util, json\n"
        "from accelerate.utils import is_tensorboard_available\n"
        "print(json.dumps({'wandb': importlib.util.find_spec('wandb') is not None,\n"
        "                  'torchvision': importlib.util.find_spec('torchvision') is not None,\n"
        "                  'tensorboard': bool(is_tensorboard_available())}))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{python}: cannot import accelerate ({out.stderr.strip()[-500:]}); use --python")
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def _prepend_path(env: dict[str, str], key: str, path: Path) -> None:
    env[key] = os.pathsep.join([str(path), *([env[key]] if env.get(key) else [])])


# ---------------------------------------------------------------------------------------------------- contenders


def ours_config(s: Settings, model_dir: Path, data_dir: Path, tensorboard: bool) -> dict[str, Any]:
    """A complete diffalign config matching the diffusers run; max_steps, output_dir and cache_dir come per run."""
    return {
        "model": {"pretrained": str(model_dir), "local_files_only": True},
        "data": {
            "path": str(data_dir),
            "split": "train",
            "resolution": s.resolution,
            "random_crop": False,
            "hflip": True,
            "proportion_empty_prompts": 0.0,
            "num_workers": s.num_workers,
        },
        "loss": {"name": "dpo", "beta": OURS_BETA},
        "lora": {
            "enabled": True,
            "rank": s.rank,
            "alpha": s.rank,
            "target_modules": list(LORA_TARGETS),
            "init": "gaussian",
        },
        "optim": {
            "optimizer": "adamw",
            "lr": LEARNING_RATE,
            "scale_lr": False,
            "weight_decay": WEIGHT_DECAY,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": MAX_GRAD_NORM,
        },
        "train": {
            "method": "dpo",
            "seed": s.seed,
            "train_batch_size": s.batch_size,
            "gradient_accumulation_steps": 1,
            "mixed_precision": "no",
            "reference": "auto",
            "checkpointing_steps": NEVER,
            "log_every": 1,
            "report_to": ["tensorboard"] if tensorboard else [],
            "progress_bar": True,
        },
    }


def _metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def make_ours(s: Settings, config_path: Path, cache_dir: Path | None) -> Contender:
    def argv(steps: int, out: Path) -> list[str]:
        cache = "null" if cache_dir is None else str(cache_dir)
        return [
            s.python,
            str(REPO_ROOT / "scripts" / "train.py"),
            "--config",
            str(config_path),
            f"train.max_steps={steps}",
            f"train.output_dir={out}",
            f"data.cache_dir={cache}",
        ]

    def check(out: Path, steps: int) -> None:
        records = _metrics(out)
        if len(records) != steps or records[-1]["step"] != steps:
            raise RuntimeError(f"{out}/metrics.jsonl: expected {steps} logged steps, found {len(records)}")
        if cache_dir is not None and not any(cache_dir.glob("*/manifest.json")):
            raise RuntimeError(f"{cache_dir}: no cache was written although data.cache_dir was set")

    env = base_env(s)
    _prepend_path(env, "PYTHONPATH", REPO_ROOT)
    name = "ours_cached" if cache_dir is not None else "ours_uncached"
    return Contender(
        name,
        argv,
        env,
        REPO_ROOT,
        check,
        step_times=lambda out: [r["step_time_s"] for r in _metrics(out)],
        losses=lambda out: [r["loss"] for r in _metrics(out)],
        lora_file="pytorch_lora_weights.safetensors",
    )


def make_floor(s: Settings, model_dir: Path, data_dir: Path, cache_dir: Path) -> Contender:
    """The bare in-memory loop (:func:`floor_worker`), reading ``ours_cached``'s cache under ``cache_dir``."""
    spec = {
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "cache_dir": str(cache_dir),
        "resolution": s.resolution,
        "seed": s.seed,
        "batch_size": s.batch_size,
        "rank": s.rank,
        "prepare_steps": s.long_steps,
        "device": "cpu" if s.device == "cpu" else "auto",
    }
    spec_path = s.work_dir / "floor.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    def argv(steps: int, out: Path) -> list[str]:
        script = str(Path(__file__).resolve())
        return [s.python, script, "--worker", "floor", "--spec", str(spec_path), "--steps", str(steps),
                "--output", str(out)]  # fmt: skip

    def result(out: Path) -> dict[str, Any]:
        path = out / "floor.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def check(out: Path, steps: int) -> None:
        if len(result(out).get("losses", [])) != steps:
            raise RuntimeError(f"{out}/floor.json: expected {steps} losses")

    env = base_env(s)
    _prepend_path(env, "PYTHONPATH", REPO_ROOT)
    return Contender(
        "floor",
        argv,
        env,
        REPO_ROOT,
        check,
        step_times=lambda out: result(out)["step_time_s"],
        losses=lambda out: result(out)["losses"],
    )


def make_diffusers(s: Settings, script: Path, model_dir: Path, data_dir: Path, stub_dir: Path | None) -> Contender:
    def argv(steps: int, out: Path) -> list[str]:
        return [
            s.python,
            str(script),
            "--pretrained_model_name_or_path",
            str(model_dir),
            "--dataset_name",
            str(data_dir),
            "--dataset_split_name",
            "train",  # the script's default is "validation"
            "--cache_dir",
            str(s.work_dir / "datasets_cache"),
            "--resolution",
            str(s.resolution),
            "--train_batch_size",
            str(s.batch_size),
            "--rank",
            str(s.rank),
            "--max_train_steps",
            str(steps),
            "--learning_rate",
            str(LEARNING_RATE),
            "--lr_scheduler",
            "constant",
            "--lr_warmup_steps",
            "0",
            "--beta_dpo",
            str(DIFFUSERS_BETA),
            "--mixed_precision",
            "no",
            "--dataloader_num_workers",
            str(s.num_workers),
            "--checkpointing_steps",
            str(NEVER),
            "--report_to",
            "tensorboard",
            "--seed",
            str(s.seed),
            "--output_dir",
            str(out),
        ]

    def check(out: Path, steps: int) -> None:
        if not (out / "pytorch_lora_weights.safetensors").is_file():
            raise RuntimeError(f"{out}: diffusers' script finished without writing pytorch_lora_weights.safetensors")

    env = base_env(s)
    if stub_dir is not None:
        _prepend_path(env, "PYTHONPATH", stub_dir)
    return Contender("diffusers", argv, env, s.work_dir, check, lora_file="pytorch_lora_weights.safetensors")


def write_wandb_stub(work_dir: Path) -> Path:
    stub = work_dir / "stubs" / "wandb"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(WANDB_STUB)
    return stub.parent


# ------------------------------------------------------------------------------------------------ the floor loop


def floor_worker(spec: dict[str, Any], steps: int, output: Path) -> None:
    """The floor contender (run as ``--worker floor``): ``steps`` Diffusion-DPO LoRA steps on tensors in memory.

    Set-up, not timed by the difference method since it is the same in every run: the UNet (``from_pretrained``)
    and peft LoRA after ``accelerate.utils.set_seed`` (as ours and diffusers: the same gaussian ``lora_A``), the
    cached latents and text embeddings of ``ours_cached`` for ``prepare_steps`` micro-batches in ours' order
    (``EpochBatches``), flips (the cache's read-time choice) and per-sample noise / timesteps, turned into the 2B-row
    model inputs ``x_t = sqrt(a)·x0 + sqrt(1 - a)·noise`` in float32 as ours computes them. The loop then does nothing
    but the training computation, in ours' order. Writes ``floor.json``: per-step losses and loop-body seconds.
    """
    import time

    import torch
    import torch.nn.functional as F  # noqa: N812
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    from diffalign.data import CachedPreferenceDataset, PreferencePairDataset, load_preference_table
    from diffalign.trainers.batching import EpochBatches
    from diffalign.utils.randomness import NOISE, TIMESTEP, per_sample_normal, per_sample_randint

    device = torch.device("cuda" if spec["device"] == "auto" and torch.cuda.is_available() else "cpu")
    seed, batch = spec["seed"], spec["batch_size"]
    set_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(spec["model_dir"], subfolder="unet").to(device)
    unet.requires_grad_(False)
    rank = spec["rank"]
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    unet.add_adapter(lora)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    alphas_cumprod = DDPMScheduler.from_pretrained(spec["model_dir"], subfolder="scheduler").alphas_cumprod.float()
    num_timesteps = alphas_cumprod.shape[0]

    table = load_preference_table(spec["data_dir"], split="train")
    pixels = PreferencePairDataset(table, resolution=spec["resolution"], random_crop=False, hflip=True, seed=seed)
    folders = [
        p.parent
        for p in sorted(Path(spec["cache_dir"]).glob("*/manifest.json"))
        if json.loads(p.read_text())["data_fingerprint"] == pixels.fingerprint
    ]
    if len(folders) != 1:
        raise RuntimeError(f"{spec['cache_dir']}: expected one cache of this data set (run ours_cached first)")
    data = CachedPreferenceDataset(folders[0], pixels)
    order = EpochBatches(len(data), batch, seed=seed)
    prepared = []
    for k in range(spec["prepare_steps"]):
        epoch, indices = order.local_indices(k)
        data.set_epoch(epoch)
        items = [data[i] for i in indices]
        x0 = torch.stack([it["latents_chosen"] for it in items] + [it["latents_rejected"] for it in items])
        hidden = torch.stack(
            [it["cond_chosen"]["encoder_hidden_states"] for it in items]
            + [it["cond_rejected"]["encoder_hidden_states"] for it in items]
        )
        noise = per_sample_normal(tuple(x0.shape[1:]), seed, epoch, indices, NOISE)
        timesteps = per_sample_randint(num_timesteps, seed, epoch, indices, TIMESTEP)
        noise, timesteps = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
        a = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0.float() + (1.0 - a).sqrt() * noise
        prepared.append(tuple(t.to(device) for t in (x_t, timesteps, hidden, noise)))

    unet.train()
    losses, seconds = [], []
    for k in range(steps):
        start = time.perf_counter()
        x_t, timesteps, hidden, target = prepared[k]
        pred = unet(x_t, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        logp = -0.5 * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        for layer in layers:
            layer._disable_adapters = True
        with torch.no_grad():
            ref = unet(x_t, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        for layer in layers:
            layer._disable_adapters = False
        ref_logp = -0.5 * (ref.float() - target).pow(2).mean(dim=(1, 2, 3))
        rho = logp - ref_logp
        loss = -F.logsigmoid(OURS_BETA * (rho[:batch] - rho[batch:])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    output.mkdir(parents=True, exist_ok=True)
    (output / "floor.json").write_text(json.dumps({"losses": [float(x) for x in losses], "step_time_s": seconds}))


# --------------------------------------------------------------------------------------------------- measurement


def run_once(c: Contender, s: Settings, steps: int, tag: str, collect: bool) -> ProcessRun:
    """One run of ``c``; with ``collect`` its losses, in-process step times and LoRA weights are kept."""
    out = s.work_dir / "runs" / f"{c.name}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = s.work_dir / "logs" / f"{c.name}-{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if c.before_run is not None:
        c.before_run()
    run = run_measured(c.argv(steps, out), env=c.env, cwd=c.cwd, log_path=log, timeout_s=s.timeout_s)
    if run.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"{c.name} ({steps} steps) exited with {run.returncode}; log {log}\ncommand: {' '.join(run.argv)}\n{tail}"
        )
    c.check(out, steps)
    if collect:
        if c.step_times is not None:
            times = c.step_times(out)[s.short_steps :] if steps > s.short_steps else c.step_times(out)
            c.in_process_step_s.append(statistics.fmean(times))
        if c.losses is not None:
            c.loss_curves.append(c.losses(out))
        if c.lora_file is not None and not c.lora_copies:
            kept = s.work_dir / "weights" / f"{c.name}-{tag}.safetensors"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / c.lora_file, kept)
            c.lora_copies.append(kept)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"  {c.name:<14} {steps:>5} steps  {run.wall_s:8.2f} s (CPU {run.cpu_s:7.2f} s)  peak RSS "
        f"{run.peak_rss_bytes / 2**20:8.1f} MiB"
    )
    return run


def measure(contenders: Sequence[Contender], s: Settings) -> None:
    print(f"priming ({s.prime_steps} step(s) each; builds the latent cache and the datasets cache):")
    for c in contenders:
        c.prime_wall_s = run_once(c, s, s.prime_steps, "prime", collect=False).wall_s
    print(f"timed runs ({s.short_steps} and {s.long_steps} steps, {s.repeats} repeat(s), contenders interleaved):")
    for rep in range(s.repeats):
        for steps in (s.short_steps, s.long_steps):
            for c in contenders:
                run = run_once(c, s, steps, f"n{steps}-r{rep}", collect=steps == s.long_steps)
                c.runs.setdefault(steps, []).append(run)


def summarize(contenders: Sequence[Contender], s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for c in contenders:
        wall = {n: [r.wall_s for r in runs] for n, runs in c.runs.items()}
        step_s, fixed_s = per_step_seconds(wall, s.statistic)
        cpu_step_s, _ = per_step_seconds({n: [r.cpu_s for r in runs] for n, runs in c.runs.items()}, s.statistic)
        results[c.name] = {
            "seconds_per_step": step_s,
            "pairs_per_s": s.batch_size / step_s if step_s > 0 else float("nan"),
            "seconds_per_step_median": per_step_seconds(wall, "median")[0],
            "seconds_per_step_min": per_step_seconds(wall, "min")[0],
            "cpu_seconds_per_step": cpu_step_s,
            "fixed_cost_s": fixed_s,
            "peak_rss_mib": max(r.peak_rss_bytes for runs in c.runs.values() for r in runs) / 2**20,
            "in_process_step_s": statistics.fmean(c.in_process_step_s) if c.in_process_step_s else None,
            "prime_wall_s": c.prime_wall_s,
            "wall_s": {str(n): [r.wall_s for r in runs] for n, runs in c.runs.items()},
            "cpu_s": {str(n): [r.cpu_s for r in runs] for n, runs in c.runs.items()},
        }
    return results


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}

    def ratio(a: str, b: str, key: str) -> float:
        return results[a][key] / results[b][key]

    if "floor" in results:
        for name in ("ours_cached", "ours_uncached", "diffusers"):
            if name in results:
                short = name.removeprefix("ours_")
                out[f"{short}_vs_floor_step_time_ratio"] = ratio(name, "floor", "seconds_per_step")
        out["cached_vs_floor_peak_rss_ratio"] = ratio("ours_cached", "floor", "peak_rss_mib")
    out["cached_vs_uncached_pairs_per_s_ratio"] = ratio("ours_cached", "ours_uncached", "pairs_per_s")
    if "diffusers" in results:
        out["cached_vs_diffusers_pairs_per_s_ratio"] = ratio("ours_cached", "diffusers", "pairs_per_s")
        out["uncached_vs_diffusers_pairs_per_s_ratio"] = ratio("ours_uncached", "diffusers", "pairs_per_s")
        out["uncached_vs_diffusers_peak_rss_ratio"] = ratio("ours_uncached", "diffusers", "peak_rss_mib")
        out["cached_vs_diffusers_peak_rss_ratio"] = ratio("ours_cached", "diffusers", "peak_rss_mib")
    # the same comparisons in CPU seconds per step (work done, whoever else shares the machine; with DataLoader
    # workers it adds their CPU time, so it is not a throughput)
    if "floor" in results:
        out["cached_vs_floor_cpu_time_ratio"] = ratio("ours_cached", "floor", "cpu_seconds_per_step")
    if "diffusers" in results:
        out["diffusers_vs_uncached_cpu_time_ratio"] = ratio("diffusers", "ours_uncached", "cpu_seconds_per_step")
    return out


def _target_lines(values: dict[str, float], targets: dict[str, tuple[str, float]]) -> list[str]:
    lines = []
    for key, (op, bound) in targets.items():
        if key in values:
            ok = values[key] >= bound if op == ">=" else values[key] <= bound
            lines.append(f"target {key} {op} {bound:g}: {'PASS' if ok else 'FAIL'} ({values[key]:.3f})")
    return lines


def report(results: dict[str, Any], rat: dict[str, float], s: Settings) -> None:
    floor = results.get("floor", {}).get("seconds_per_step")
    floor_cpu = results.get("floor", {}).get("cpu_seconds_per_step")
    other = "median" if s.statistic == "min" else "min"
    rows = []
    for name, r in results.items():
        in_proc = r["in_process_step_s"]
        rows.append(
            [
                name,
                f"{r['pairs_per_s']:.2f}",
                f"{r['seconds_per_step'] * 1000:.1f}",
                "-" if not floor else f"{r['seconds_per_step'] / floor:.2f}",
                f"{r[f'seconds_per_step_{other}'] * 1000:.1f}",
                "-" if in_proc is None else f"{in_proc * 1000:.1f}",
                f"{r['cpu_seconds_per_step'] * 1000:.1f}",
                "-" if not floor_cpu else f"{r['cpu_seconds_per_step'] / floor_cpu:.2f}",
                f"{r['fixed_cost_s']:.1f}",
                f"{r['peak_rss_mib']:.0f}",
            ]
        )
    headers = ["contender", "pairs/s", "ms/step", "x floor", f"ms/step ({other})", "in-proc ms/step", "CPU ms/step"]
    headers += ["CPU x floor", "fixed s", "RSS MiB"]
    print()
    print(describe(s))
    print(format_table(headers, rows))
    print()
    for name, r in results.items():
        print(f"{name}_pairs_per_s={r['pairs_per_s']:.4g}")
        print(f"{name}_seconds_per_step={r['seconds_per_step']:.4g}")
        print(f"{name}_peak_rss_mib={r['peak_rss_mib']:.1f}")
    for key, value in rat.items():
        print(f"{key}={value:.3f}")
    for line in _target_lines(rat, TARGETS):
        print(line)


def describe(s: Settings) -> str:
    latent = s.resolution // 2 ** (s.vae_levels - 1)
    sizes = f"{s.image_min}" if s.image_min == s.image_max else f"{s.image_min}-{s.image_max}"
    return (
        f"batch {s.batch_size} pairs, resolution {s.resolution} (latent {latent}, {s.vae_levels}-level VAE), "
        f"LoRA rank {s.rank}, {s.pairs} pairs of {s.images} {sizes} px, threads {s.threads}, workers "
        f"{s.num_workers}, device {s.device}, steps {s.short_steps}->{s.long_steps} x{s.repeats} ({s.statistic} "
        "of the repeats)"
    )


# ----------------------------------------------------------------------------------------------------- parity


def read_safetensors_f32(path: Path) -> dict[str, tuple[list[int], array]]:
    """``{name: (shape, float32 values)}`` of a safetensors file of F32 tensors, read without torch or numpy (the
    measuring process must stay small, see :func:`prepare_assets`)."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {entry['dtype']}, expected F32")
        start, end = entry["data_offsets"]
        values = array("f")
        values.frombytes(data[8 + header_len + start : 8 + header_len + end])
        if sys.byteorder != "little":
            values.byteswap()
        out[name] = (list(entry["shape"]), values)
    return out


def compare_lora(ours: Path, theirs: Path, steps: int) -> dict[str, Any]:
    """Same LoRA keys and shapes, same initial ``lora_A`` and ``lora_B`` moved by the same amount after ``steps``
    AdamW steps (see the module docstring); ``lora_ok`` says whether all hold."""
    a, b = read_safetensors_f32(ours), read_safetensors_f32(theirs)
    shapes_match = {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    down = [k for k in a if ".lora_A." in k or ".lora.down." in k]
    up = [k for k in a if ".lora_B." in k or ".lora.up." in k]
    result: dict[str, Any] = {"lora_keys": len(a), "lora_shapes_match": shapes_match}
    if not shapes_match or not down or not up:
        return {**result, "lora_ok": False}

    def max_abs(keys: list[str], side: dict[str, tuple[list[int], array]]) -> float:
        return max(abs(x) for k in keys for x in side[k][1])

    init_diff = max(abs(x - y) for k in down for x, y in zip(a[k][1], b[k][1], strict=True))
    bound = 2 * ADAM_STEP_BOUND * LEARNING_RATE * steps * (1 + WEIGHT_DECAY * max_abs(down, a))
    b_ours, b_theirs = max_abs(up, a), max_abs(up, b)
    b_bound = ADAM_STEP_BOUND * LEARNING_RATE * steps
    ok = init_diff <= bound and 0 < b_ours <= b_bound and 0 < b_theirs <= b_bound and 0.5 <= b_ours / b_theirs <= 2
    return {
        **result,
        "lora_A_max_abs": max_abs(down, a),
        "lora_A_max_abs_diff": init_diff,
        "lora_A_bound": bound,
        "lora_B_max_abs_ours": b_ours,
        "lora_B_max_abs_diffusers": b_theirs,
        "lora_B_bound": b_bound,
        "lora_ok": ok,
    }


def parity(contenders: dict[str, Contender], steps: int) -> dict[str, Any]:
    """Loss parity of ours vs the floor and the LoRA comparison of ours vs diffusers (first long run of each)."""
    out: dict[str, Any] = {}
    ok = True
    floor = contenders.get("floor")
    if floor is not None and floor.loss_curves:
        out["floor_losses"] = floor.loss_curves[0]
        for name in ("ours_cached", "ours_uncached"):
            c = contenders.get(name)
            if c is None or not c.loss_curves:
                continue
            curve = c.loss_curves[0]
            diff = max(abs(x - y) for x, y in zip(curve, floor.loss_curves[0], strict=True))
            out[f"{name}_losses"] = curve
            out[f"{name}_vs_floor_loss_max_abs_diff"] = diff
            if name == "ours_cached":
                out["cached_floor_losses_match"] = diff <= FLOOR_LOSS_ATOL
                out["losses_moved"] = max(abs(x - math.log(2)) for x in curve)
                ok &= out["cached_floor_losses_match"]
    diffusers = contenders.get("diffusers")
    ours = contenders.get("ours_uncached") or contenders.get("ours_cached")
    if diffusers is not None and diffusers.lora_copies and ours is not None and ours.lora_copies:
        out["lora_vs_diffusers"] = compare_lora(ours.lora_copies[0], diffusers.lora_copies[0], steps)
        ok &= out["lora_vs_diffusers"]["lora_ok"]
    out["parity_ok"] = ok
    return out


def report_parity(p: dict[str, Any]) -> None:
    print()
    if "floor_losses" in p:
        print(f"floor losses:       {' '.join(f'{x:.7f}' for x in p['floor_losses'][:12])}")
    for name in ("ours_cached", "ours_uncached"):
        if f"{name}_losses" in p:
            print(f"{name + ' losses:':<20}{' '.join(f'{x:.7f}' for x in p[f'{name}_losses'][:12])}")
            print(f"{name}_vs_floor_loss_max_abs_diff={p[f'{name}_vs_floor_loss_max_abs_diff']:.3g}")
    if "cached_floor_losses_match" in p:
        verdict = "match" if p["cached_floor_losses_match"] else "DIFFER"
        print(f"ours_cached vs floor per-step losses {verdict} (tolerance {FLOOR_LOSS_ATOL:g})")
    lora = p.get("lora_vs_diffusers")
    if lora is not None:
        for key, value in lora.items():
            print(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    print(f"parity_ok={str(p['parity_ok']).lower()}")


# ------------------------------------------------------------------------------------- full fine-tune (--full-ft)


def full_ft_config(
    s: Settings, model_dir: Path, data_dir: Path, cache_dir: Path, reference: str, optimizer: str
) -> dict[str, Any]:
    """Full-fine-tune training on cached latents. ``reference`` is ``train.reference`` of DPO, or ``"sft"`` /
    ``"sft_2x"`` for SFT on the winners (no reference) at the batch or twice the batch; nothing else differs."""
    config = ours_config(s, model_dir, data_dir, tensorboard=False)
    config["data"]["cache_dir"] = str(cache_dir)
    config["lora"] = {"enabled": False}
    config["optim"]["optimizer"] = optimizer
    if reference.startswith("sft"):
        config["train"]["method"] = "sft"
        config["loss"] = {"name": "sft"}
        config["train"]["reference"] = "auto"
        if reference == "sft_2x":
            config["train"]["train_batch_size"] = 2 * s.batch_size
    else:
        config["train"]["reference"] = reference
    return config


def make_full_ft(
    s: Settings, config_path: Path, cache_dir: Path, name: str, precomputed: bool, mmap_threshold: int | None = None
) -> Contender:
    """A ``scripts/train.py`` run of ``config_path``. With ``precomputed`` every run starts from an empty reference
    store, so its precompute pass (one no-grad forward per micro-batch) is inside the measured process. With
    ``mmap_threshold`` the process runs with ``MALLOC_MMAP_THRESHOLD_`` set (see :data:`FULL_FT_KINDS`)."""

    def argv(steps: int, out: Path) -> list[str]:
        script = str(REPO_ROOT / "scripts" / "train.py")
        return [s.python, script, "--config", str(config_path), f"train.max_steps={steps}", f"train.output_dir={out}"]

    def wipe_reference_store() -> None:
        for folder in cache_dir.glob("*/reference"):
            shutil.rmtree(folder)

    def check(out: Path, steps: int) -> None:
        if len(_metrics(out)) != steps:
            raise RuntimeError(f"{out}/metrics.jsonl: expected {steps} logged steps, found {len(_metrics(out))}")
        if precomputed and not any(cache_dir.glob("*/reference/*/epoch-*.safetensors")):
            raise RuntimeError(f"{cache_dir}: train.reference=precomputed wrote no reference store")

    env = base_env(s)
    _prepend_path(env, "PYTHONPATH", REPO_ROOT)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return Contender(
        name,
        argv,
        env,
        REPO_ROOT,
        check,
        before_run=wipe_reference_store if precomputed else None,
        step_times=lambda out: [r["step_time_s"] for r in _metrics(out)],
        losses=lambda out: [r["loss"] for r in _metrics(out)],
    )


def safetensors_numel(folder: Path) -> int:
    """Number of elements in the safetensors files of ``folder``, from their JSON headers (no torch import: the
    measuring process must stay small, see :func:`prepare_assets`)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                n = 1
                for dim in entry["shape"]:
                    n *= dim
                total += n
    return total


FULL_FT_KINDS = ("frozen_copy", "precomputed", "sft", "sft_2x")
# The same runs with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``; glibc otherwise raises it each time a
# large block is freed, so later activation-sized blocks come from the heap and stay resident after they are freed):
# what the peaks are when freed memory goes back to the system.
MMAP_KINDS = ("frozen_copy", "precomputed", "sft")


def main_full_ft(args: argparse.Namespace, s: Settings) -> int:
    """Peak RSS, step time and loss curves of full-fine-tune training: DPO with a frozen reference copy, DPO with a
    precomputed reference, SFT (no reference) and SFT at twice the batch."""
    channels = [int(c) for c in args.unet_channels.split(",")]
    model_dir, data_dir = prepare_assets(s, channels, args.unet_layers)
    params = safetensors_numel(model_dir / "unet")
    cache_dir = s.work_dir / "latent_cache_full_ft"
    kinds = [k for k in FULL_FT_KINDS if not (k == "sft_2x" and args.no_sft_2x)]
    mmap = args.mmap_threshold if args.mmap_threshold > 0 else None
    mmap_tag = "" if mmap is None else f"_mmap{mmap // 1024}k"
    contenders: dict[str, dict[str, Contender]] = {}
    for optimizer in args.optimizers:
        contenders[optimizer] = {}
        for kind in kinds:
            name = f"ours_{optimizer}_{kind}"
            path = s.work_dir / f"full_ft_{name}.yaml"
            config = full_ft_config(s, model_dir, data_dir, cache_dir, kind, optimizer)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            contenders[optimizer][kind] = make_full_ft(s, path, cache_dir, name, kind == "precomputed")
            if mmap is not None and kind in MMAP_KINDS:
                contenders[optimizer][kind + mmap_tag] = make_full_ft(
                    s, path, cache_dir, name + mmap_tag, kind == "precomputed", mmap
                )
    everyone = [c for group in contenders.values() for c in group.values()]
    print(f"work folder: {s.work_dir}")
    print(f"command: {' '.join(everyone[0].argv(s.long_steps, s.work_dir / 'runs' / 'OUT'))}")
    measure(everyone, s)
    results = summarize(everyone, s)

    mib = params * 4 / 2**20
    print()
    print(
        f"full fine-tune, UNet block_out_channels {channels} x{args.unet_layers} layers: {params / 1e6:.1f}M "
        f"parameters = {mib:.0f} MiB fp32; batch {s.batch_size} pairs (sft_2x: {2 * s.batch_size}), resolution "
        f"{s.resolution} (latent {s.resolution // 2 ** (s.vae_levels - 1)}), cached latents, threads {s.threads}, "
        f"steps {s.short_steps}->{s.long_steps} x{s.repeats}"
    )
    rows = []
    for name, r in results.items():
        in_proc = r["in_process_step_s"]
        rows.append(
            [
                name,
                f"{r['seconds_per_step'] * 1000:.0f}",
                "-" if in_proc is None else f"{in_proc * 1000:.0f}",
                f"{r['cpu_seconds_per_step'] * 1000:.0f}",
                f"{r['fixed_cost_s']:.1f}",
                f"{r['peak_rss_mib']:.0f}",
            ]
        )
    headers = ["contender", "ms/step (process)", "ms/step (in-proc)", "CPU ms/step", "fixed s", "peak RSS MiB"]
    print(format_table(headers, rows))
    print("(process ms/step includes the precompute pass: one no-grad forward per micro-batch, before training)")
    print()
    copy_ratios: dict[str, float] = {}
    sft_ratios: dict[str, float] = {}
    mmap_ratios: dict[str, float] = {}
    all_match = True
    for optimizer, group in contenders.items():
        curve_copy, curve_pre = group["frozen_copy"].loss_curves[0], group["precomputed"].loss_curves[0]
        diff = max(abs(a - b) for a, b in zip(curve_copy, curve_pre, strict=True))
        match = len(curve_copy) == len(curve_pre) and diff <= FULL_FT_LOSS_ATOL
        all_match &= match
        print(f"{optimizer} loss curve, frozen copy: {' '.join(f'{x:.6f}' for x in curve_copy)}")
        print(f"{optimizer} loss curve, precomputed: {' '.join(f'{x:.6f}' for x in curve_pre)}")
        verdict = "match" if match else "DIFFER"
        print(f"{optimizer} loss curves {verdict}: max |difference| {diff:.3g} (tolerance {FULL_FT_LOSS_ATOL:g})")
        rss = {kind: results[c.name]["peak_rss_mib"] for kind, c in group.items()}
        copy_ratios[optimizer] = rss["precomputed"] / rss["frozen_copy"]
        sft_ratios[optimizer] = rss["precomputed"] / rss["sft"]
        print(
            f"{optimizer}: peak RSS {rss['frozen_copy']:.0f} MiB (frozen copy) vs {rss['precomputed']:.0f} MiB "
            f"(precomputed): saved {rss['frozen_copy'] - rss['precomputed']:.0f} MiB = "
            f"{(rss['frozen_copy'] - rss['precomputed']) / mib:.2f} x the UNet's {mib:.0f} MiB"
        )
        line = (
            f"{optimizer}: precomputed DPO {rss['precomputed']:.0f} MiB vs SFT {rss['sft']:.0f} MiB: "
            f"{rss['precomputed'] - rss['sft']:+.0f} MiB"
        )
        if "sft_2x" in rss:
            line += (
                f"; SFT at batch {2 * s.batch_size} (DPO's 2B rows per forward) {rss['sft_2x']:.0f} MiB, so "
                f"{rss['sft_2x'] - rss['sft']:+.0f} MiB is the second half of the rows (activations) and "
                f"{rss['precomputed'] - rss['sft_2x']:+.0f} MiB the rest"
            )
        print(line)
        if mmap is not None:
            pre, sft, copy = (rss[k + mmap_tag] for k in ("precomputed", "sft", "frozen_copy"))
            mmap_ratios[optimizer] = pre / sft
            print(
                f"{optimizer} with MALLOC_MMAP_THRESHOLD_={mmap}: frozen copy {copy:.0f}, precomputed {pre:.0f}, SFT "
                f"{sft:.0f} MiB: precomputed/SFT {pre / sft:.3f}, copy saved {(copy - pre) / mib:.2f} x the UNet; "
                f"the default allocator kept {rss['precomputed'] - pre:+.0f} MiB (precomputed) and "
                f"{rss['sft'] - sft:+.0f} MiB (SFT) more"
            )
    print()
    print(f"denoiser_params={params}")
    print(f"denoiser_fp32_mib={mib:.1f}")
    for name, r in results.items():
        print(f"{name}_peak_rss_mib={r['peak_rss_mib']:.1f}")
        print(f"{name}_seconds_per_step={r['seconds_per_step']:.4g}")
    print(f"loss_curves_match={str(all_match).lower()}")
    for optimizer in contenders:
        print(f"precomputed_vs_copy_peak_rss_ratio_{optimizer}={copy_ratios[optimizer]:.3f}")
        print(f"precomputed_vs_sft_peak_rss_ratio_{optimizer}={sft_ratios[optimizer]:.3f}")
        if optimizer in mmap_ratios:
            print(f"precomputed_vs_sft_peak_rss_ratio{mmap_tag}_{optimizer}={mmap_ratios[optimizer]:.3f}")
    first = args.optimizers[0]
    for line in _target_lines({"precomputed_vs_sft_peak_rss_ratio": sft_ratios[first]}, FULL_FT_TARGETS):
        print(line)
    if args.json:
        payload = {
            "settings": {k: str(v) for k, v in vars(s).items()},
            "results": results,
            "ratios": {
                "precomputed_vs_copy": copy_ratios,
                "precomputed_vs_sft": sft_ratios,
                f"precomputed_vs_sft{mmap_tag}": mmap_ratios,
            },
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"precomputed_vs_copy_peak_rss_ratio={copy_ratios[first]:.3f}")
    print(f"precomputed_vs_sft_peak_rss_ratio={sft_ratios[first]:.3f}")
    return 0 if all_match else 1


# ----------------------------------------------------------------------------------------------------------- main


def build_contenders(args: argparse.Namespace, s: Settings, script: Path | None) -> list[Contender] | int:
    """ours_cached, floor, ours_uncached (not with --parity-only) and diffusers (when its script is usable), in the
    order they run; an exit status if the diffusers script cannot run."""
    found = probe_python(s.python)
    model_dir, data_dir = prepare_assets(s)
    config_path = s.work_dir / "ours.yaml"
    config_path.write_text(yaml.safe_dump(ours_config(s, model_dir, data_dir, found["tensorboard"]), sort_keys=False))
    cache_dir = s.work_dir / "latent_cache"
    contenders = [make_ours(s, config_path, cache_dir), make_floor(s, model_dir, data_dir, cache_dir)]
    if not args.parity_only:
        contenders.append(make_ours(s, config_path, None))
    if script is None:
        print(f"{DIFFUSERS_SCRIPT_HINT}\nMeasuring diffalign and the floor only.\n")
    elif not found["torchvision"]:
        print(f"error: diffusers' script imports torchvision, which {s.python} lacks: pip install torchvision")
        return 2
    else:
        stub = None if found["wandb"] else write_wandb_stub(s.work_dir)
        if stub is not None:
            print("note: wandb is not installed; diffusers' script imports it at the top, so a stub module is put")
            print(f"      on its PYTHONPATH ({stub}); the script itself is unmodified.")
        contenders.append(make_diffusers(s, script, model_dir, data_dir, stub))
    return contenders


def run_benchmark(args: argparse.Namespace, s: Settings, script: Path | None) -> dict[str, Any] | int:
    """The LoRA benchmark (or, with ``--parity-only``, one run per contender); returns everything it printed."""
    contenders = build_contenders(args, s, script)
    if isinstance(contenders, int):
        return contenders
    print(f"work folder: {s.work_dir}")
    for c in contenders:
        print(f"{c.name} command: {' '.join(c.argv(s.long_steps, s.work_dir / 'runs' / 'OUT'))}")
    by_name = {c.name: c for c in contenders}
    if args.parity_only:
        print(f"parity runs ({s.long_steps} steps each, untimed):")
        for c in contenders:
            run_once(c, s, s.long_steps, f"parity-n{s.long_steps}", collect=True)
        payload: dict[str, Any] = {"parity": parity(by_name, s.long_steps)}
        report_parity(payload["parity"])
    else:
        measure(contenders, s)
        results = summarize(contenders, s)
        rat = ratios(results)
        payload = {"results": results, "ratios": rat, "parity": parity(by_name, s.long_steps)}
        report(results, rat, s)
        report_parity(payload["parity"])
    payload["settings"] = {k: str(v) for k, v in vars(s).items()}
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return payload


def settings_from(args: argparse.Namespace, work_dir: Path) -> Settings:
    return Settings(
        python=args.python,
        work_dir=work_dir,
        resolution=args.resolution,
        image_min=args.image_sizes[0],
        image_max=args.image_sizes[1],
        images=args.images,
        vae_levels=args.vae_levels,
        pairs=args.pairs,
        batch_size=args.batch_size,
        rank=args.rank,
        threads=args.threads,
        num_workers=args.num_workers,
        device=args.device,
        seed=args.seed,
        prime_steps=args.prime_steps,
        short_steps=args.short_steps,
        long_steps=args.long_steps,
        repeats=args.repeats,
        timeout_s=args.timeout,
        statistic=args.statistic,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "prepare":
        prepare_worker(json.loads(Path(args.spec).read_text()))
        return 0
    if args.worker == "floor":
        floor_worker(json.loads(Path(args.spec).read_text()), args.steps, Path(args.output))
        return 0
    script = Path(args.diffusers_script).expanduser().resolve() if args.diffusers_script else None
    if script is not None and not script.is_file():
        print(f"error: --diffusers-script {script}: no such file.\n{DIFFUSERS_SCRIPT_HINT}", file=sys.stderr)
        return 2
    temporary = args.work_dir is None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_offline-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    s = settings_from(args, work_dir)
    try:
        if args.full_ft:
            return main_full_ft(args, s)
        payload = run_benchmark(args, s, script)
        if isinstance(payload, int):
            return payload
        return 0 if payload["parity"]["parity_ok"] else 1
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif temporary:
            print(f"kept {work_dir}")


if __name__ == "__main__":
    sys.exit(main())
