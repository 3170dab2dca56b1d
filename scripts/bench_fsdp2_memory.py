"""Per-process training state under FSDP2 against one process: parameters + gradients + optimizer state.

Usage::

    python scripts/bench_fsdp2_memory.py                          # 2 CPU processes, 89M-parameter UNet, AdamW
    python scripts/bench_fsdp2_memory.py --processes 4 --unet-channels 128,256 --lora

Full fine-tune (or ``--lora``) Diffusion-DPO with a precomputed reference on a tiny SD pipeline whose UNet is made
large (``--unet-channels``), 2 steps, fp32: once on one process, once through ``configs/accelerate/fsdp.yaml`` on
``--processes`` CPU processes (gloo; the trainer shards by itself, the code a GPU run uses). Each run logs
``train_state_mib`` on its first step: that process's parameters, gradients and optimizer state, counting a sharded
tensor's local shard (``diffalign.trainers.sharding.local_state_bytes``), averaged over processes. Prints both and
``fsdp2_vs_single_state_ratio=R`` (target for 2 processes: <= 0.55; an even split is 0.5), plus each run's peak
memory (its whole process tree: launcher and every rank, ``diffalign.utils.benchmark.run_measured``), which also
holds what no sharding divides (the Python processes, torch, the frozen text encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet  # noqa: E402
from diffalign.models.tiny import save_tiny_sd_pipeline  # noqa: E402
from diffalign.utils.benchmark import run_measured  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--unet-channels", default="256,512", help="UNet block_out_channels (256,512: 89M parameters)")
    parser.add_argument("--lora", action="store_true", help="LoRA rank 4 instead of a full fine-tune")
    parser.add_argument("--work-dir", help="folder for model, data and runs (default: a temporary folder)")
    return parser.parse_args(argv)


def train_command(processes: int, model: Path, data: Path, out: Path, lora: bool) -> list[str]:
    script = [
        str(REPO / "scripts" / "train.py"),
        "--config",
        str(REPO / "configs" / "toy" / "dpo.yaml"),
        f"model.pretrained={model}",
        f"data.path={data}",
        "data.cache_dir=null",
        "data.resolution=16",
        f"lora.enabled={str(lora).lower()}",
        "lora.rank=4",
        "train.reference=precomputed",
        "train.train_batch_size=2",
        "train.max_steps=2",
        "train.progress_bar=false",
        f"train.output_dir={out}",
        "train.overwrite_output_dir=true",  # a rerun with --work-dir measures afresh
    ]
    if processes == 1:
        return [sys.executable, *script]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(processes)]
    return [*launch, "--mixed_precision", "no", "--main_process_port", "0", *script]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_fsdp2_"))
    channels = tuple(int(c) for c in args.unet_channels.split(","))
    model = work / "model"
    if not model.is_dir():
        save_tiny_sd_pipeline(model, with_vae=False, sample_size=16, block_out_channels=channels)
    data = write_pickapic_parquet(work / "pairs.parquet", make_random_pairs(16, size=16, seed=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    results = {}
    for name, processes in (("single", 1), ("fsdp2", args.processes)):
        out = work / f"run-{name}"
        log = work / f"run-{name}.log"
        run = run_measured(train_command(processes, model, data, out, args.lora), env=env, log_path=log)
        if run.returncode != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            return 1
        first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        peak = max(run.peak_rss_bytes, run.peak_tree_bytes) / 2**20
        results[name] = {"train_state_mib": first["train_state_mib"], "peak_mib": peak}
    ratio = results["fsdp2"]["train_state_mib"] / results["single"]["train_state_mib"]
    kind = "LoRA" if args.lora else "full fine-tune"
    print(f"{kind}, UNet channels {channels}, AdamW, {args.processes} FSDP2 processes vs 1:")
    for name, r in results.items():
        print(
            f"  {name:>6}: train state {r['train_state_mib']:.1f} MiB per process; peak memory {r['peak_mib']:.0f} MiB"
        )
    print(f"fsdp2_vs_single_state_ratio={ratio:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
