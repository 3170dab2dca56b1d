"""The contenders of the LoRA benchmark: how ``ours_cached`` / ``ours_uncached`` (scripts/train.py), the floor
(``--worker floor``) and diffusers' ``train_diffusion_dpo.py`` are configured, launched and checked, and what each
finished run leaves to collect (losses, in-process step times, LoRA weights)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import REPO_ROOT
from .common import (
    BENCH_SCRIPT,
    DIFFUSERS_BETA,
    LEARNING_RATE,
    LORA_TARGETS,
    MAX_GRAD_NORM,
    NEVER,
    OURS_BETA,
    WEIGHT_DECAY,
    Contender,
    Settings,
    base_env,
    prepend_path,
)

WANDB_STUB = '''"""Stub written by diffalign's scripts/bench_offline.py: diffusers' train_diffusion_dpo.py
imports wandb at the top but uses it only to log validation images, which the benchmark never runs.
Any use fails loudly."""


def __getattr__(name):
    raise AttributeError(f"wandb is not installed (benchmark stub); wandb.{name} is unavailable")
'''


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


def read_metrics(out: Path) -> list[dict[str, Any]]:
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
        records = read_metrics(out)
        if len(records) != steps or records[-1]["step"] != steps:
            raise RuntimeError(f"{out}/metrics.jsonl: expected {steps} logged steps, found {len(records)}")
        if cache_dir is not None and not any(cache_dir.glob("*/manifest.json")):
            raise RuntimeError(f"{cache_dir}: no cache was written although data.cache_dir was set")

    name = "ours_cached" if cache_dir is not None else "ours_uncached"
    return train_script_contender(name, s, argv, check, lora_file="pytorch_lora_weights.safetensors")


def train_script_contender(
    name: str,
    s: Settings,
    argv: Callable[[int, Path], list[str]],
    check: Callable[[Path, int], None],
    extra_env: dict[str, str] | None = None,
    **fields: Any,
) -> Contender:
    """A contender that runs ``scripts/train.py`` from this checkout: its per-step seconds and losses are read from
    the run's ``metrics.jsonl``; ``fields`` are further :class:`Contender` fields."""
    env = base_env(s)
    prepend_path(env, "PYTHONPATH", REPO_ROOT)
    env.update(extra_env or {})
    return Contender(
        name,
        argv,
        env,
        REPO_ROOT,
        check,
        step_times=lambda out: [r["step_time_s"] for r in read_metrics(out)],
        losses=lambda out: [r["loss"] for r in read_metrics(out)],
        **fields,
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
        script = str(BENCH_SCRIPT)
        return [s.python, script, "--worker", "floor", "--spec", str(spec_path), "--steps", str(steps),
                "--output", str(out)]  # fmt: skip

    def result(out: Path) -> dict[str, Any]:
        path = out / "floor.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def check(out: Path, steps: int) -> None:
        if len(result(out).get("losses", [])) != steps:
            raise RuntimeError(f"{out}/floor.json: expected {steps} losses")

    env = base_env(s)
    prepend_path(env, "PYTHONPATH", REPO_ROOT)
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
        prepend_path(env, "PYTHONPATH", stub_dir)
    return Contender("diffusers", argv, env, s.work_dir, check, lora_file="pytorch_lora_weights.safetensors")


def write_wandb_stub(work_dir: Path) -> Path:
    stub = work_dir / "stubs" / "wandb"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text(WANDB_STUB)
    return stub.parent
