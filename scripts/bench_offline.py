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

Code: this file is the command line and the orchestration; the parts (assets, contenders, the floor loop,
measurement, report, parity, ``--full-ft``) are modules of ``scripts/bench_offline_lib/``, listed in its ``__init__``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:  # loaded by path (tests/test_bench_offline.py): find bench_offline_lib
    sys.path.insert(0, str(SCRIPTS_DIR))

from bench_offline_lib.assets import make_pickapic_like_rows as make_pickapic_like_rows  # noqa: E402 (re-exported)
from bench_offline_lib.assets import prepare_assets, prepare_worker  # noqa: E402
from bench_offline_lib.common import Contender, Settings  # noqa: E402
from bench_offline_lib.contenders import (  # noqa: E402
    make_diffusers,
    make_floor,
    make_ours,
    ours_config,
    probe_python,
    write_wandb_stub,
)
from bench_offline_lib.floor import floor_worker  # noqa: E402
from bench_offline_lib.full_ft import FULL_FT_DEFAULTS, main_full_ft  # noqa: E402
from bench_offline_lib.measure import measure, run_once, summarize  # noqa: E402
from bench_offline_lib.parity import FLOOR_LOSS_ATOL as FLOOR_LOSS_ATOL  # noqa: E402 (re-exported)
from bench_offline_lib.parity import parity, report_parity  # noqa: E402
from bench_offline_lib.report import ratios, report  # noqa: E402

DIFFUSERS_SCRIPT_ENV = "DIFFUSERS_DPO_SCRIPT"
DIFFUSERS_SCRIPT_HINT = (
    "diffusers' train_diffusion_dpo.py is not part of the diffusers pip package. To compare against it:\n"
    "    git clone --depth 1 https://github.com/huggingface/diffusers\n"
    "    python scripts/bench_offline.py --diffusers-script "
    "diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py\n"
    f"(or set {DIFFUSERS_SCRIPT_ENV}). Its imports also need torchvision."
)


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
