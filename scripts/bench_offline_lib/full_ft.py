"""``--full-ft``: peak RSS, step time and loss curves of full-fine-tune training on cached latents, Diffusion-DPO
with a frozen reference copy vs precomputed reference log-likelihoods vs SFT (no reference), each optionally with
glibc's mmap threshold fixed; see the last paragraph of scripts/bench_offline.py's docstring."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from diffalign.utils.benchmark import format_table

from . import REPO_ROOT
from .assets import prepare_assets
from .common import Contender, Settings
from .contenders import ours_config, read_metrics, train_script_contender
from .measure import measure, summarize
from .report import target_lines

FULL_FT_TARGETS = {"precomputed_vs_sft_peak_rss_ratio": ("<=", 1.03)}


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
        if len(read_metrics(out)) != steps:
            raise RuntimeError(f"{out}/metrics.jsonl: expected {steps} logged steps, found {len(read_metrics(out))}")
        if precomputed and not any(cache_dir.glob("*/reference/*/epoch-*.safetensors")):
            raise RuntimeError(f"{cache_dir}: train.reference=precomputed wrote no reference store")

    extra_env = {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold is not None else None
    before_run = wipe_reference_store if precomputed else None
    return train_script_contender(name, s, argv, check, extra_env, before_run=before_run)


def safetensors_numel(folder: Path) -> int:
    """Number of elements in the safetensors files of ``folder``, from their JSON headers (no torch import: the
    measuring process must stay small, see :func:`.assets.prepare_assets`)."""
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
    for line in target_lines({"precomputed_vs_sft_peak_rss_ratio": sft_ratios[first]}, FULL_FT_TARGETS):
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
