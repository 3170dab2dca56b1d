"""Benchmark Diffusion-DPO LoRA training: pairs/s and peak RSS of diffalign's offline trainer, with and without the
latent / text-embedding cache, against diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``.

Usage::

    python scripts/bench_offline.py --quick                                   # smoke run, about two minutes on CPU
    python scripts/bench_offline.py --diffusers-script PATH/train_diffusion_dpo.py --device cpu --threads 1

diffusers' script is not in the pip package. Get it with
``git clone --depth 1 https://github.com/huggingface/diffusers`` and pass
``--diffusers-script diffusers/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (or set
``DIFFUSERS_DPO_SCRIPT``); without it only diffalign is measured. Its imports need ``torchvision``; it imports
``wandb`` unconditionally but uses it only for validation images, so when wandb is not installed a stub module (on
the PYTHONPATH of that subprocess only) lets the unmodified script start. ``--report_to tensorboard`` is passed (the
script's default); accelerate drops it silently when tensorboard is not installed, and when it is installed diffalign
logs to tensorboard too, so both pay the same tracker cost.

Set-up (seeded, written under ``--work-dir``): one tiny SD pipeline WITH a VAE (``diffalign.models.tiny``; image side
``--resolution``; ``--vae-levels`` 2 gives latents at half of it; 4 gives SD's VAE shape: an eighth, two ResNet
layers per level), so "without the
cache" runs the VAE and the text encoder every step as diffusers does, and a Pick-a-Pic-layout parquet of
``--pairs`` random-image pairs.

Contenders, all at the same batch, resolution, LoRA rank (alpha = rank, q/k/v/out, gaussian init), optimizer (AdamW,
lr 1e-5, constant), fp32, beta (diffusers' 2500 = our 5000, its logit has no 1/2), hflip on, one process, no
DataLoader workers and the same ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``; the reference is the UNet with LoRA
adapters disabled in all of them:

* ``ours_cached``: ``scripts/train.py ... data.cache_dir=...``; the one-off cache build happens in the priming run
  and is excluded from the timing.
* ``ours_uncached``: ``scripts/train.py ...`` encoding images and prompts every step.
* ``diffusers``: ``python train_diffusion_dpo.py ...``.

Method: every contender first runs ``--prime-steps`` once (cache build, ``datasets`` arrow cache, page cache). Then
each runs ``--short-steps`` and ``--long-steps`` steps in fresh subprocesses, ``--repeats`` times, contenders
interleaved so that drifting load on a shared machine hits all of them alike. Seconds per step are
``(median t(long) - median t(short)) / (long - short)`` of whole-process wall times: start-up, model loading and the
final save cancel, and neither script is instrumented. pairs/s = batch / (seconds per step). Peak RSS is the largest
kernel high-water mark (and psutil-sampled process-tree sum) over a contender's timed runs; see
``diffalign.utils.benchmark``. For diffalign the mean in-process ``step_time_s`` of ``metrics.jsonl`` over the steps
after ``--short-steps`` is printed as a cross-check of the difference.

Output: a table, then ``key=value`` lines, among them ``cached_vs_diffusers_pairs_per_s_ratio``,
``uncached_vs_diffusers_pairs_per_s_ratio``, ``uncached_vs_diffusers_peak_rss_ratio`` and
``cached_vs_diffusers_peak_rss_ratio`` (targets: >= 3, >= 1, <= 1; cached peak RSS is reported too).

``--full-ft`` measures something else: full-fine-tune Diffusion-DPO (cached latents, fp32, same seed) with the
reference as a frozen copy of the UNet (``train.reference=frozen_copy``) vs precomputed reference log-likelihoods
(``train.reference=precomputed``), on a tiny pipeline whose UNet is made big enough (``--unet-channels``, default
256,512: 89M parameters) for the UNet and its optimizer state to dominate RSS. Each run of the precomputed contender
starts from an empty reference store, so its precompute pass is inside the measured process. Same method as above
(priming run, short and long runs in fresh subprocesses, peak RSS over the timed runs); ``--optimizers adamw
adafactor`` measures each optimizer. It prints both peak RSS, per-step times (whole process, which includes the
precompute pass, and in-process training steps), both loss curves and whether they match (max |difference| <= 1e-6;
exit status 1 if not), and ends with ``precomputed_vs_copy_peak_rss_ratio=R`` (for the first optimizer)::

    python scripts/bench_offline.py --full-ft --optimizers adamw adafactor
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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
TARGETS = {  # the targets, at equal batch, resolution and LoRA rank
    "cached_vs_diffusers_pairs_per_s_ratio": (">=", 3.0),
    "uncached_vs_diffusers_pairs_per_s_ratio": (">=", 1.0),
    "uncached_vs_diffusers_peak_rss_ratio": ("<=", 1.0),
}
# --full-ft: unless given on the command line (a small model whose UNet + optimizer state dominate RSS)
FULL_FT_DEFAULTS = {"pairs": 32, "batch_size": 2, "short_steps": 2, "long_steps": 6, "repeats": 1}
FULL_FT_LOSS_ATOL = 1e-6
WANDB_STUB = '''"""Stub written by diffalign's scripts/bench_offline.py: diffusers' train_diffusion_dpo.py
imports wandb at the top but uses it only to log validation images, which the benchmark never runs.
Any use fails loudly."""


def __getattr__(name):
    raise AttributeError(f"wandb is not installed (benchmark stub); wandb.{name} is unavailable")
'''


@dataclass(frozen=True)
class Settings:
    python: str
    work_dir: Path
    resolution: int
    image_size: int
    vae_levels: int
    pairs: int
    batch_size: int
    rank: int
    threads: int
    device: str
    seed: int
    prime_steps: int
    short_steps: int
    long_steps: int
    repeats: int
    timeout_s: float


@dataclass
class Contender:
    """One way of training: ``argv(steps, output_dir)`` builds its command; ``check`` verifies a finished run."""

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


# -------------------------------------------------------------------------------------------------------- set-up


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Diffusion-DPO LoRA pairs/s and peak RSS: diffalign (cached, uncached) vs diffusers' script.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--diffusers-script",
        default=os.environ.get(DIFFUSERS_SCRIPT_ENV),
        help=f"path of diffusers' train_diffusion_dpo.py (default: ${DIFFUSERS_SCRIPT_ENV})",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few pairs and steps, one repeat")
    parser.add_argument("--work-dir", help="folder for model, data, caches and logs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (always kept with --work-dir)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every contender")
    parser.add_argument("--resolution", type=int, default=32, help="training image side")
    parser.add_argument(
        "--vae-levels",
        type=int,
        default=2,
        choices=(2, 3, 4),
        help="VAE levels: latents at resolution / 2**(levels-1); 4 = SD-shaped (factor 8, 2 layers per level)",
    )
    parser.add_argument("--image-size", type=int, help="side of the stored images (default: --resolution)")
    parser.add_argument("--pairs", type=int, default=256, help="preference pairs in the parquet")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every run")
    parser.add_argument(
        "--device", choices=("cpu", "auto"), default="cpu", help="cpu hides GPUs; auto lets accelerate choose"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prime-steps", type=int, default=1, help="steps of the untimed priming run")
    parser.add_argument("--short-steps", type=int, default=10)
    parser.add_argument("--long-steps", type=int, default=110)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender and step count")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before one run is killed")
    parser.add_argument("--json", help="also write the results to this JSON file")
    full = parser.add_argument_group(
        "full fine-tune reference memory (--full-ft)",
        "Full-fine-tune Diffusion-DPO with a frozen reference copy vs precomputed reference log-likelihoods; "
        f"unless given, --full-ft uses {FULL_FT_DEFAULTS} (--quick: UNet channels 128,256)",
    )
    full.add_argument("--full-ft", action="store_true", help="measure peak RSS: frozen copy vs precomputed reference")
    full.add_argument(
        "--unet-channels", default="256,512", help="UNet block_out_channels of the --full-ft model (two levels)"
    )
    full.add_argument("--unet-layers", type=int, default=2, help="UNet layers_per_block of the --full-ft model")
    full.add_argument(
        "--optimizers",
        nargs="+",
        default=["adamw"],
        choices=("adamw", "adafactor", "adamw_8bit"),
        help="--full-ft: measure each; the last output line is the first one's ratio",
    )
    args = parser.parse_args(argv)
    if args.full_ft:
        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        for name, value in FULL_FT_DEFAULTS.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
        if args.quick:
            args.unet_channels = "128,256"
    if args.quick and not args.full_ft:
        args.pairs, args.batch_size, args.short_steps, args.long_steps, args.repeats = 32, 2, 2, 12, 1
    if args.image_size is None:
        args.image_size = args.resolution
    factor = 2 ** (args.vae_levels - 1)
    if args.resolution % factor or args.resolution // factor < 4:
        parser.error(f"--resolution {args.resolution}: use a multiple of {factor} giving latents of at least 4 px")
    if args.image_size < args.resolution:
        parser.error(f"--image-size {args.image_size} is below --resolution {args.resolution}")
    if args.prime_steps < 1:
        parser.error(f"--prime-steps {args.prime_steps}: must be >= 1")
    if not 1 <= args.short_steps < args.long_steps:
        parser.error(f"need 1 <= --short-steps < --long-steps, got {args.short_steps} and {args.long_steps}")
    if args.pairs < args.batch_size:
        parser.error(f"--pairs {args.pairs} is smaller than one batch of {args.batch_size}")
    if args.repeats < 1 or args.threads < 1 or args.rank < 1:
        parser.error("--repeats, --threads and --rank must be >= 1")
    return args


_PREPARE_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.models.tiny import save_tiny_sd_pipeline
a = json.loads(sys.argv[1])
if a["model_dir"]:
    unet = dict(block_out_channels=tuple(a["unet_channels"]), layers_per_block=a["unet_layers"]) if a.get(
        "unet_channels") else dict()
    save_tiny_sd_pipeline(a["model_dir"], with_vae=True, sample_size=a["resolution"], seed=a["seed"],
                          vae_block_out_channels=tuple(a["vae_channels"]), vae_layers_per_block=a["vae_layers"],
                          **unet)
if a["parquet"]:
    write_pickapic_parquet(a["parquet"], make_random_pairs(a["pairs"], size=a["image_size"], seed=a["seed"]))
"""


def prepare_assets(s: Settings, unet_channels: Sequence[int] | None = None, unet_layers: int = 2) -> tuple[Path, Path]:
    """Write the tiny SD pipeline (with VAE) and the parquet (``<work>/data/train.parquet``); return both folders.

    ``unet_channels`` / ``unet_layers`` set a bigger UNet (``<work>/model_unet<channels>x<layers>``; --full-ft).
    Built in a subprocess: on Linux a child's ``ru_maxrss`` includes the peak of the process it was forked from, so
    the measuring process must stay small or every contender would report at least its size.
    """
    model_dir, data_dir = s.work_dir / "model", s.work_dir / "data"
    if unet_channels:
        model_dir = s.work_dir / f"model_unet{'-'.join(map(str, unet_channels))}x{unet_layers}"
    parquet = data_dir / "train.parquet"
    todo = {
        "model_dir": None if (model_dir / "model_index.json").is_file() else str(model_dir),
        "parquet": None if parquet.is_file() else str(parquet),
        "resolution": s.resolution,
        "image_size": s.image_size,
        "pairs": s.pairs,
        "seed": s.seed,
        "vae_channels": [32, 64, 64, 64][: s.vae_levels],
        "vae_layers": 2 if s.vae_levels == 4 else 1,  # SD's VAE: layers_per_block 2
        "unet_channels": list(unet_channels) if unet_channels else None,
        "unet_layers": unet_layers,
    }
    if todo["model_dir"] or todo["parquet"]:
        code = _PREPARE_CODE.format(repo=str(REPO_ROOT))
        subprocess.run([s.python, "-c", code, json.dumps(todo)], check=True)
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
            "num_workers": 0,
        },
        "loss": {"name": "dpo", "beta": OURS_BETA},
        "lora": {
            "enabled": True,
            "rank": s.rank,
            "alpha": s.rank,
            "target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
            "init": "gaussian",
        },
        "optim": {
            "optimizer": "adamw",
            "lr": LEARNING_RATE,
            "scale_lr": False,
            "weight_decay": 1e-2,
            "lr_scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
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
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
        if len(lines) != steps or json.loads(lines[-1])["step"] != steps:
            raise RuntimeError(f"{out}/metrics.jsonl: expected {steps} logged steps, found {len(lines)}")
        if cache_dir is not None and not any(cache_dir.glob("*/manifest.json")):
            raise RuntimeError(f"{cache_dir}: no cache was written although data.cache_dir was set")

    env = base_env(s)
    _prepend_path(env, "PYTHONPATH", REPO_ROOT)
    name = "ours_cached" if cache_dir is not None else "ours_uncached"
    return Contender(name, argv, env, REPO_ROOT, check)


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
            "0",
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
    return Contender("diffusers", argv, env, s.work_dir, check)


def write_wandb_stub(work_dir: Path) -> Path:
    stub = work_dir / "stubs" / "wandb"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(WANDB_STUB)
    return stub.parent


# --------------------------------------------------------------------------------------------------- measurement


def run_once(c: Contender, s: Settings, steps: int, tag: str) -> ProcessRun:
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
    if c.name.startswith("ours") and steps == s.long_steps:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        c.in_process_step_s.append(statistics.fmean(r["step_time_s"] for r in records[s.short_steps :]))
        c.loss_curves.append([r["loss"] for r in records])
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {c.name:<14} {steps:>5} steps  {run.wall_s:8.2f} s  peak RSS {run.peak_rss_bytes / 2**20:8.1f} MiB")
    return run


def measure(contenders: Sequence[Contender], s: Settings) -> None:
    print(f"priming ({s.prime_steps} step(s) each; builds the latent cache and the datasets cache):")
    for c in contenders:
        c.prime_wall_s = run_once(c, s, s.prime_steps, "prime").wall_s
    print(f"timed runs ({s.short_steps} and {s.long_steps} steps, {s.repeats} repeat(s), contenders interleaved):")
    for rep in range(s.repeats):
        for steps in (s.short_steps, s.long_steps):
            for c in contenders:
                c.runs.setdefault(steps, []).append(run_once(c, s, steps, f"n{steps}-r{rep}"))


def summarize(contenders: Sequence[Contender], s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for c in contenders:
        step_s, fixed_s = per_step_seconds({n: [r.wall_s for r in runs] for n, runs in c.runs.items()})
        results[c.name] = {
            "seconds_per_step": step_s,
            "pairs_per_s": s.batch_size / step_s if step_s > 0 else float("nan"),
            "fixed_cost_s": fixed_s,
            "peak_rss_mib": max(r.peak_rss_bytes for runs in c.runs.values() for r in runs) / 2**20,
            "in_process_step_s": statistics.fmean(c.in_process_step_s) if c.in_process_step_s else None,
            "prime_wall_s": c.prime_wall_s,
            "wall_s": {str(n): [r.wall_s for r in runs] for n, runs in c.runs.items()},
        }
    return results


def ratios(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}

    def ratio(a: str, b: str, key: str) -> float:
        return results[a][key] / results[b][key]

    out["cached_vs_uncached_pairs_per_s_ratio"] = ratio("ours_cached", "ours_uncached", "pairs_per_s")
    if "diffusers" in results:
        out["cached_vs_diffusers_pairs_per_s_ratio"] = ratio("ours_cached", "diffusers", "pairs_per_s")
        out["uncached_vs_diffusers_pairs_per_s_ratio"] = ratio("ours_uncached", "diffusers", "pairs_per_s")
        out["uncached_vs_diffusers_peak_rss_ratio"] = ratio("ours_uncached", "diffusers", "peak_rss_mib")
        out["cached_vs_diffusers_peak_rss_ratio"] = ratio("ours_cached", "diffusers", "peak_rss_mib")
    return out


def report(results: dict[str, Any], rat: dict[str, float], s: Settings) -> None:
    rows = []
    for name, r in results.items():
        in_proc = r["in_process_step_s"]
        rows.append(
            [
                name,
                f"{r['pairs_per_s']:.2f}",
                f"{r['seconds_per_step'] * 1000:.1f}",
                "-" if in_proc is None else f"{in_proc * 1000:.1f}",
                f"{r['fixed_cost_s']:.1f}",
                f"{r['peak_rss_mib']:.0f}",
            ]
        )
    headers = ["contender", "pairs/s", "ms/step", "in-proc ms/step", "fixed s", "peak RSS MiB"]
    print()
    print(
        f"batch {s.batch_size} pairs, resolution {s.resolution} (latent {s.resolution // 2 ** (s.vae_levels - 1)}), "
        f"LoRA rank {s.rank}, "
        f"{s.pairs} pairs, threads {s.threads}, device {s.device}, steps {s.short_steps}->{s.long_steps} "
        f"x{s.repeats}"
    )
    print(format_table(headers, rows))
    print()
    for name, r in results.items():
        print(f"{name}_pairs_per_s={r['pairs_per_s']:.4g}")
        print(f"{name}_peak_rss_mib={r['peak_rss_mib']:.1f}")
    for key, value in rat.items():
        print(f"{key}={value:.3f}")
    for key, (op, bound) in TARGETS.items():
        if key in rat:
            ok = rat[key] >= bound if op == ">=" else rat[key] <= bound
            print(f"target {key} {op} {bound:g}: {'PASS' if ok else 'FAIL'} ({rat[key]:.3f})")


# ------------------------------------------------------------------------------------- full fine-tune (--full-ft)


def full_ft_config(
    s: Settings, model_dir: Path, data_dir: Path, cache_dir: Path, reference: str, optimizer: str
) -> dict[str, Any]:
    """Full-fine-tune Diffusion-DPO on cached latents; only ``train.reference`` differs between the two contenders."""
    config = ours_config(s, model_dir, data_dir, tensorboard=False)
    config["data"]["cache_dir"] = str(cache_dir)
    config["lora"] = {"enabled": False}
    config["optim"]["optimizer"] = optimizer
    config["train"]["reference"] = reference
    return config


def make_full_ft(s: Settings, config_path: Path, cache_dir: Path, name: str, precomputed: bool) -> Contender:
    """A ``scripts/train.py`` run of ``config_path``. With ``precomputed`` every run starts from an empty reference
    store, so its precompute pass (one no-grad forward per micro-batch) is inside the measured process."""

    def argv(steps: int, out: Path) -> list[str]:
        script = str(REPO_ROOT / "scripts" / "train.py")
        return [s.python, script, "--config", str(config_path), f"train.max_steps={steps}", f"train.output_dir={out}"]

    def wipe_reference_store() -> None:
        for folder in cache_dir.glob("*/reference"):
            shutil.rmtree(folder)

    def check(out: Path, steps: int) -> None:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
        if len(lines) != steps:
            raise RuntimeError(f"{out}/metrics.jsonl: expected {steps} logged steps, found {len(lines)}")
        if precomputed and not any(cache_dir.glob("*/reference/*/epoch-*.safetensors")):
            raise RuntimeError(f"{cache_dir}: train.reference=precomputed wrote no reference store")

    env = base_env(s)
    _prepend_path(env, "PYTHONPATH", REPO_ROOT)
    return Contender(name, argv, env, REPO_ROOT, check, before_run=wipe_reference_store if precomputed else None)


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


def main_full_ft(args: argparse.Namespace, s: Settings) -> int:
    """Peak RSS, step time and loss curves of full-fine-tune DPO: frozen reference copy vs precomputed reference."""
    channels = [int(c) for c in args.unet_channels.split(",")]
    model_dir, data_dir = prepare_assets(s, channels, args.unet_layers)
    params = safetensors_numel(model_dir / "unet")
    cache_dir = s.work_dir / "latent_cache_full_ft"
    contenders: dict[str, tuple[Contender, Contender]] = {}
    for optimizer in args.optimizers:
        pair = []
        for reference in ("frozen_copy", "precomputed"):
            name = f"ours_{optimizer}_{reference}"
            path = s.work_dir / f"full_ft_{name}.yaml"
            config = full_ft_config(s, model_dir, data_dir, cache_dir, reference, optimizer)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            pair.append(make_full_ft(s, path, cache_dir, name, reference == "precomputed"))
        contenders[optimizer] = (pair[0], pair[1])
    everyone = [c for pair in contenders.values() for c in pair]
    print(f"work folder: {s.work_dir}")
    print(f"command: {' '.join(everyone[0].argv(s.long_steps, s.work_dir / 'runs' / 'OUT'))}")
    measure(everyone, s)
    results = summarize(everyone, s)

    mib = params * 4 / 2**20
    print()
    print(
        f"full fine-tune DPO, UNet block_out_channels {channels} x{args.unet_layers} layers: {params / 1e6:.1f}M "
        f"parameters = {mib:.0f} MiB fp32; batch {s.batch_size} pairs, resolution {s.resolution}, cached latents, "
        f"threads {s.threads}, steps {s.short_steps}->{s.long_steps} x{s.repeats}"
    )
    rows = []
    for name, r in results.items():
        in_proc = r["in_process_step_s"]
        rows.append(
            [
                name,
                f"{r['seconds_per_step'] * 1000:.0f}",
                "-" if in_proc is None else f"{in_proc * 1000:.0f}",
                f"{r['fixed_cost_s']:.1f}",
                f"{r['peak_rss_mib']:.0f}",
            ]
        )
    print(format_table(["contender", "ms/step (process)", "ms/step (in-proc)", "fixed s", "peak RSS MiB"], rows))
    print("(process ms/step includes the precompute pass: one no-grad forward per micro-batch, before training)")
    print()
    ratios: dict[str, float] = {}
    all_match = True
    for optimizer, (copy_run, pre_run) in contenders.items():
        curve_copy, curve_pre = copy_run.loss_curves[0], pre_run.loss_curves[0]
        diff = max(abs(a - b) for a, b in zip(curve_copy, curve_pre, strict=True))
        match = len(curve_copy) == len(curve_pre) and diff <= FULL_FT_LOSS_ATOL
        all_match &= match
        print(f"{optimizer} loss curve, frozen copy: {' '.join(f'{x:.6f}' for x in curve_copy)}")
        print(f"{optimizer} loss curve, precomputed: {' '.join(f'{x:.6f}' for x in curve_pre)}")
        verdict = "match" if match else "DIFFER"
        print(f"{optimizer} loss curves {verdict}: max |difference| {diff:.3g} (tolerance {FULL_FT_LOSS_ATOL:g})")
        copy_rss, pre_rss = results[copy_run.name]["peak_rss_mib"], results[pre_run.name]["peak_rss_mib"]
        ratios[optimizer] = pre_rss / copy_rss
        print(
            f"{optimizer}: peak RSS {copy_rss:.0f} MiB (frozen copy) vs {pre_rss:.0f} MiB (precomputed): saved "
            f"{copy_rss - pre_rss:.0f} MiB = {(copy_rss - pre_rss) / mib:.2f} x the UNet's {mib:.0f} MiB"
        )
    print()
    print(f"denoiser_params={params}")
    print(f"denoiser_fp32_mib={mib:.1f}")
    for name, r in results.items():
        print(f"{name}_peak_rss_mib={r['peak_rss_mib']:.1f}")
        print(f"{name}_seconds_per_step={r['seconds_per_step']:.4g}")
    print(f"loss_curves_match={str(all_match).lower()}")
    for optimizer, ratio in ratios.items():
        print(f"precomputed_vs_copy_peak_rss_ratio_{optimizer}={ratio:.3f}")
    if args.json:
        payload = {"settings": {k: str(v) for k, v in vars(s).items()}, "results": results, "ratios": ratios}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"precomputed_vs_copy_peak_rss_ratio={ratios[args.optimizers[0]]:.3f}")
    return 0 if all_match else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    script = Path(args.diffusers_script).expanduser().resolve() if args.diffusers_script else None
    if script is not None and not script.is_file():
        print(f"error: --diffusers-script {script}: no such file.\n{DIFFUSERS_SCRIPT_HINT}", file=sys.stderr)
        return 2
    temporary = args.work_dir is None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_offline-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    s = Settings(
        python=args.python,
        work_dir=work_dir,
        resolution=args.resolution,
        image_size=args.image_size,
        vae_levels=args.vae_levels,
        pairs=args.pairs,
        batch_size=args.batch_size,
        rank=args.rank,
        threads=args.threads,
        device=args.device,
        seed=args.seed,
        prime_steps=args.prime_steps,
        short_steps=args.short_steps,
        long_steps=args.long_steps,
        repeats=args.repeats,
        timeout_s=args.timeout,
    )
    try:
        if args.full_ft:
            return main_full_ft(args, s)
        found = probe_python(s.python)
        model_dir, data_dir = prepare_assets(s)
        config_path = work_dir / "ours.yaml"
        config_path.write_text(
            yaml.safe_dump(ours_config(s, model_dir, data_dir, found["tensorboard"]), sort_keys=False)
        )
        contenders = [make_ours(s, config_path, work_dir / "latent_cache"), make_ours(s, config_path, None)]
        if script is None:
            print(f"{DIFFUSERS_SCRIPT_HINT}\nMeasuring diffalign only.\n")
        elif not found["torchvision"]:
            print(f"error: diffusers' script imports torchvision, which {s.python} lacks: pip install torchvision")
            return 2
        else:
            stub = None if found["wandb"] else write_wandb_stub(work_dir)
            if stub is not None:
                print("note: wandb is not installed; diffusers' script imports it at the top, so a stub module is put")
                print(f"      on its PYTHONPATH ({stub}); the script itself is unmodified.")
            contenders.append(make_diffusers(s, script, model_dir, data_dir, stub))
        print(f"work folder: {work_dir}")
        print(f"diffalign command: {' '.join(contenders[0].argv(s.long_steps, work_dir / 'runs' / 'OUT'))}")
        if script is not None:
            print(f"diffusers command: {' '.join(contenders[-1].argv(s.long_steps, work_dir / 'runs' / 'OUT'))}")
        measure(contenders, s)
        results = summarize(contenders, s)
        rat = ratios(results)
        report(results, rat, s)
        if args.json:
            payload = {"settings": {k: str(v) for k, v in vars(s).items()}, "results": results, "ratios": rat}
            Path(args.json).write_text(json.dumps(payload, indent=2))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif temporary:
            print(f"kept {work_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
