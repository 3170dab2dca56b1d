"""Benchmark diffalign's causal-LM DPO step against ``trl.DPOTrainer`` (TRL 1.16): step time, peak RSS, loss values.

Usage::

    python scripts/bench_llm.py                                  # defaults: ~1-2 minutes on one CPU thread
    python scripts/bench_llm.py --steps 5 --warmup 1 --hidden-size 32 --json out.json   # smoke run

Set-up (seeded, written under ``--workdir``, a temporary folder by default): a tiny ``LlamaForCausalLM``
(``--hidden-size``, ``--layers``, 4 heads, MLP 4x hidden, tied embeddings) with the CLIP BPE tokenizer (49408 tokens,
so the LM head and its log-softmax are a real share of the step; ``--model`` takes any ``save_pretrained`` folder
with a tokenizer instead), and a preference JSONL (``prompt, chosen, rejected``, standard text) of exactly
``--batch-size`` rows, some longer than ``--max-length``: every optimizer step of both trainers sees the whole data
set, i.e. the same batch (TRL's sampler shuffles the rows within it, which changes the loss only by float rounding).

Both sides, each in a fresh subprocess (so ``ru_maxrss`` is that side's peak RSS): full fine-tuning from the same
weights with a frozen reference copy (ours: ``train.reference=frozen_copy`` deep-copies the policy; TRL 1.16 with
``ref_model=None`` and a non-PEFT model loads a second copy from the model's folder, ``create_model_from_path``),
fp32 (TRL's ``bf16`` and ``gradient_checkpointing`` turned off), DPO sigmoid loss with beta 0.1, AdamW (betas 0.9,
0.999, eps 1e-8, weight decay 0), the same constant learning rate without warm-up, gradient clipping at 1.0,
``max_length`` truncation keeping the start, dropout disabled, no gradient accumulation, logging every step, no
checkpoints during the timed steps, one process, ``--threads`` torch / OMP / MKL threads, no DataLoader workers.
TRL's optimizer is its default ``adamw_torch_fused`` unless ``--trl-optim`` says otherwise; ours is
``torch.optim.AdamW`` (on CPU: the single-tensor loop).

Timing scope. The headline per-step time of each side is the median, over the steps after ``--warmup``, of the
wall-clock interval between the ends of two consecutive optimizer steps: everything one iteration of the training
loop does (fetch and collate the batch, forward of policy and reference, loss, backward, clipping, optimizer and
schedule step, metric reduction and logging). Ours: the time each step's metrics reach ``MetricsWriter.log`` (after
the optimizer step); TRL: ``TrainerCallback.on_step_end`` (after the optimizer step, before that step's logging,
which falls into the next interval). Printed as ``ours_step_s``, ``trl_step_s`` and ``speed_ratio = trl_step_s /
ours_step_s`` (> 1: ours is faster). As cross-checks: ours' in-process ``step_time_s`` from ``metrics.jsonl``
(batch fetch + collation through the optimizer step and metric reduction, without writing the log line) and TRL's
``on_step_begin`` -> ``on_step_end`` (excludes the batch fetch, which the HF Trainer does before ``on_step_begin``).
Start-up, model loading, TRL's dataset tokenisation and the final save are outside every timing.

Peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of each worker at the end of training (``*_peak_rss_mib``,
``rss_ratio = ours / trl``, < 1: ours uses less), and the same high-water mark just before training starts
(``*_rss_before_train_mib``: imports, both models, data), so the training-time increase can be read off.

Loss values: the per-step training loss of each side (TRL's is captured from ``compute_loss``, unrounded), the
first-step loss (must be ln 2 on both: policy = reference), and ``loss_max_abs_diff`` over all steps. The TRL worker
also tokenises and collates the rows with diffalign's ``tokenize_preference`` / ``collate_preference`` and compares
them with TRL's tokenised dataset and ``DataCollatorForPreference`` (``tokenization_match``).

Output: ``key=value`` lines, among them ``speed_ratio``, ``rss_ratio`` and ``loss_max_abs_diff``; ``--json OUT``
writes every result. Target: ``speed_ratio >= 1`` and ``rss_ratio <= 1`` with the same losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/bench_llm.py` without an installed package
    sys.path.insert(0, str(REPO_ROOT))

LN2 = math.log(2.0)
NEVER = 10**9  # a checkpointing interval no run reaches
WORDS = (
    "the a red blue green small large dog cat bird house tree river mountain city road car boat sun moon star "
    "light dark warm cold fast slow happy quiet loud bright soft old new tall short round square yellow purple "
    "garden window door table chair book paper music song dance walk run jump swim fly sleep dream think write"
).split()


# ------------------------------------------------------------------------------------------------------------ set-up


def make_rows(batch_size: int, max_length: int, seed: int) -> list[dict[str, str]]:
    """``batch_size`` preference rows of random words: prompts of about max_length/4 words and completions of
    varied lengths, some past ``max_length`` (truncation), chosen and rejected of different lengths (padding)."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))

    rows = []
    for i in range(batch_size):
        prompt_words = max(2, max_length // 4 + rng.randint(-2, 2))
        chosen_words = max(1, (max_length * (i % 3 + 1)) // 3 - prompt_words + rng.randint(-3, 6))
        rejected_words = max(1, chosen_words // 2 + rng.randint(0, 4))
        rows.append(
            {"prompt": text(prompt_words), "chosen": " " + text(chosen_words), "rejected": " " + text(rejected_words)}
        )
    return rows


def build_model(out: Path, hidden_size: int, layers: int, max_length: int, seed: int) -> int:
    """Save a tiny Llama + the CLIP tokenizer to ``out``; return its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from diffalign.models.clip_tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(model_max_length=max(1024, 4 * max_length))
    torch.manual_seed(seed)
    heads = 4 if hidden_size % 4 == 0 else 1
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(256, 2 * max_length),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------- workers


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _intervals(ends: list[float], warmup: int) -> list[float]:
    """Seconds between consecutive step ends, for steps warmup+1 .. (1-based; step 1's interval is unknown)."""
    return [ends[k] - ends[k - 1] for k in range(max(1, warmup), len(ends))]


def worker_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    import diffalign.trainers.base as base
    from diffalign.config import config_from_dict
    from diffalign.trainers.llm_preference import LLMPreferenceTrainer
    from diffalign.trainers.metrics import read_metrics

    out_dir = Path(spec["output_dir"])
    config = config_from_dict(
        {
            "model": {"backbone": "causal_lm", "pretrained": spec["model"], "torch_dtype": "float32"},
            "data": {"path": spec["data"], "max_length": spec["max_length"]},
            "loss": {"name": "trl_sigmoid", "beta": spec["beta"]},
            "lora": {"enabled": False},
            "optim": {
                "optimizer": "adamw",
                "lr": spec["lr"],
                "weight_decay": 0.0,
                "lr_scheduler": "constant",
                "warmup_steps": 0,
                "max_grad_norm": 1.0,
            },
            "train": {
                "method": "preference",
                "reference": "frozen_copy",
                "max_steps": spec["steps"],
                "train_batch_size": spec["batch_size"],
                "output_dir": str(out_dir),
                "overwrite_output_dir": True,  # a rerun with --workdir measures afresh
                "progress_bar": False,
                "checkpointing_steps": NEVER,
                "log_every": 1,
                "seed": spec["seed"],
                "mixed_precision": "no",
            },
        },
        source="bench_llm",
    )
    step_ends: list[float] = []
    original_log = base.MetricsWriter.log

    def timed_log(self: Any, step: int, metrics: dict[str, Any]) -> None:
        step_ends.append(time.perf_counter())
        original_log(self, step, metrics)

    base.MetricsWriter.log = timed_log  # type: ignore[method-assign]
    trainer = LLMPreferenceTrainer(config)
    original_build = trainer.build
    rss_before: list[float] = []

    def build_and_mark() -> None:
        original_build()
        rss_before.append(_peak_rss_mib())

    trainer.build = build_and_mark  # type: ignore[method-assign]
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    peak = _peak_rss_mib()
    records = read_metrics(out_dir)
    # where the time goes: the per-step tokenisation + collation of the batch, timed on its own after training
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        trainer.collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    data_s = (time.perf_counter() - t0) / reps
    return {
        "losses": [r["loss"] for r in records],
        "step_time_s": [r["step_time_s"] for r in records],
        "step_ends": step_ends,
        "peak_rss_mib": peak,
        "rss_before_train_mib": rss_before[0] if rss_before else float("nan"),
        "train_wall_s": wall,
        "tokenize_collate_s": data_s,
    }


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)

    begins: list[float] = []
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            begins.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    losses: list[float] = []

    class RecordingDPOTrainer(DPOTrainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = out[0] if return_outputs else out
            if model.training:
                losses.append(float(loss.detach()))
            return out

    args = DPOConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim=spec["trl_optim"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        loss_type=["sigmoid"],
        beta=spec["beta"],
        max_length=spec["max_length"],
        truncation_mode="keep_start",
        disable_dropout=True,
        precompute_ref_log_probs=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=spec["seed"],
        disable_tqdm=True,
    )
    trainer = RecordingDPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    if trainer.ref_model is None:
        raise RuntimeError("TRL built no reference model: the comparison needs its frozen copy")
    rss_before = _peak_rss_mib()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    peak = _peak_rss_mib()  # read before the tokenisation check below imports diffalign
    return {
        "losses": losses,
        "step_begins": begins,
        "step_ends": ends,
        "peak_rss_mib": peak,
        "rss_before_train_mib": rss_before,
        "train_wall_s": wall,
        "optimizer": _describe_optimizer(trainer.optimizer),
        "tokenization": compare_tokenization(trainer, tokenizer, rows, spec["max_length"]),
    }


def _describe_optimizer(optimizer: Any) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    flags = {k: inner.defaults.get(k) for k in ("fused", "foreach")}
    flags["group_weight_decay"] = sorted({g["weight_decay"] for g in inner.param_groups})  # what applies
    flags["lr"] = sorted({g["lr"] for g in inner.param_groups})
    return f"{type(inner).__name__}({', '.join(f'{k}={v}' for k, v in flags.items())})"


def compare_tokenization(trainer: Any, tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> dict[str, Any]:
    """diffalign's tokenisation and collation of ``rows`` against TRL's (its tokenised train set and collator)."""
    import torch

    from diffalign.models.causal_lm import collate_preference, tokenize_preference

    trl_rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    ours_rows = [tokenize_preference(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    mismatches = []
    for i, (t, o) in enumerate(zip(trl_rows, ours_rows, strict=False)):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(t[key]) != list(o[key]):
                mismatches.append({"row": i, "key": key, "trl": list(t[key]), "ours": list(o[key])})
    trl_batch = trainer.data_collator(
        [{k: t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for t in trl_rows]
    )
    ours_batch = collate_preference(ours_rows, pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    batch_equal = {
        key: bool(trl_batch[key].shape == ours_batch[key].shape and torch.equal(trl_batch[key], ours_batch[key]))
        for key in ("input_ids", "attention_mask", "completion_mask")
    }
    first = trl_rows[0] if trl_rows else {}
    return {
        "rows_trl": len(trl_rows),
        "rows_ours": len(ours_rows),
        "mismatches": mismatches[:5],
        "n_mismatches": len(mismatches),
        "batch_equal": batch_equal,
        "match": not mismatches and len(trl_rows) == len(ours_rows) and all(batch_equal.values()),
        "example": {k: list(first.get(k, [])) for k in ("prompt_ids", "chosen_ids", "rejected_ids")},
        "batch_shape": list(ours_batch["input_ids"].shape),
        "completion_tokens": int(ours_batch["completion_mask"].sum()),
    }


# ------------------------------------------------------------------------------------------------------------ driver


def run_worker(side: str, spec: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    spec_path = workdir / f"spec_{side}.json"
    result_path = workdir / f"result_{side}.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    threads = str(spec["threads"])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--spec", str(spec_path)]
    cmd += ["--result", str(result_path)]
    proc = subprocess.run(cmd, env=env, cwd=str(workdir), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(
            f"{side} worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return json.loads(result_path.read_text())


def summarise(ours: list[dict[str, Any]], trl: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians over the measured steps of every repeat, max peak RSS, loss comparison of the first repeat."""

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    ours_iv = [x for r in ours for x in _intervals(r["step_ends"], warmup)]
    trl_iv = [x for r in trl for x in _intervals(r["step_ends"], warmup)]
    ours_inner = [x for r in ours for x in r["step_time_s"][warmup:]]
    trl_inner = [e - b for r in trl for b, e in list(zip(r["step_begins"], r["step_ends"], strict=False))[warmup:]]
    ours_losses, trl_losses = ours[0]["losses"], trl[0]["losses"]
    n = min(len(ours_losses), len(trl_losses))
    diffs = [abs(a - b) for a, b in zip(ours_losses[:n], trl_losses[:n], strict=True)]
    ours_step, trl_step = med(ours_iv), med(trl_iv)
    ours_rss = max(r["peak_rss_mib"] for r in ours)
    trl_rss = max(r["peak_rss_mib"] for r in trl)
    return {
        "ours_step_s": ours_step,
        "trl_step_s": trl_step,
        "speed_ratio": trl_step / ours_step,
        "ours_inner_step_s": med(ours_inner),
        "trl_inner_step_s": med(trl_inner),
        "inner_speed_ratio": med(trl_inner) / med(ours_inner),
        "measured_steps": len(ours_iv),
        "ours_peak_rss_mib": ours_rss,
        "trl_peak_rss_mib": trl_rss,
        "rss_ratio": ours_rss / trl_rss,
        "ours_rss_before_train_mib": max(r["rss_before_train_mib"] for r in ours),
        "trl_rss_before_train_mib": max(r["rss_before_train_mib"] for r in trl),
        "ours_train_rss_increase_mib": ours_rss - max(r["rss_before_train_mib"] for r in ours),
        "trl_train_rss_increase_mib": trl_rss - max(r["rss_before_train_mib"] for r in trl),
        "ours_tokenize_collate_s": med([r["tokenize_collate_s"] for r in ours]),
        "ours_losses": ours_losses,
        "trl_losses": trl_losses,
        "ours_first_loss": ours_losses[0] if ours_losses else float("nan"),
        "trl_first_loss": trl_losses[0] if trl_losses else float("nan"),
        "loss_steps_compared": n,
        "loss_max_abs_diff": max(diffs) if diffs else float("nan"),
        "loss_abs_diffs": diffs,
        "trl_optimizer": trl[0]["optimizer"],
        "tokenization_match": trl[0]["tokenization"]["match"],
        "tokenization": trl[0]["tokenization"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (default 5, min 1)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step = rows in the data set (default 4)")
    p.add_argument("--max-length", type=int, default=48, help="prompt+completion tokens kept (default 48)")
    p.add_argument("--threads", type=int, default=1, help="torch / OMP / MKL threads of each worker (default 1)")
    p.add_argument("--hidden-size", type=int, default=64, help="tiny Llama hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="tiny Llama decoder layers (default 2)")
    p.add_argument("--model", default=None, help="a save_pretrained folder (model + tokenizer) instead of the tiny one")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of both (default 1e-4)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--trl-optim", default="adamw_torch_fused", help="TRL's optim (default: its own adamw_torch_fused)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side, interleaved (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the model, data and runs go (default: a temporary folder)")
    p.add_argument("--json", dest="json_out", default=None, help="write every result to this JSON file")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker (default 1800)")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        if args.steps < 2 or not 1 <= args.warmup < args.steps:
            p.error("need --steps >= 2 and 1 <= --warmup < --steps (the first step's interval is not measured)")
    return args


def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_llm_")
        workdir = Path(tmp.name)
    else:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        n_params = None
        if args.model is None:
            model_dir = workdir / "model"
            n_params = build_model(model_dir, args.hidden_size, args.layers, args.max_length, args.seed)
        else:
            model_dir = Path(args.model).resolve()
        data = workdir / "pairs.jsonl"
        rows = make_rows(args.batch_size, args.max_length, args.seed)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {
            "model": str(model_dir),
            "data": str(data),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "threads": args.threads,
            "lr": args.lr,
            "beta": args.beta,
            "seed": args.seed,
            "trl_optim": args.trl_optim,
        }
        ours, trl = [], []
        for k in range(args.repeats):
            order = ("ours", "trl") if k % 2 == 0 else ("trl", "ours")
            for side in order:
                side_spec = {**spec, "output_dir": str(workdir / f"run_{side}_{k}")}
                result = run_worker(side, side_spec, workdir, args.timeout)
                (ours if side == "ours" else trl).append(result)
        summary = summarise(ours, trl, args.warmup)
        summary["settings"] = {
            **{k: v for k, v in spec.items() if k not in ("model", "data")},
            "warmup": args.warmup,
            "repeats": args.repeats,
            "hidden_size": args.hidden_size if args.model is None else None,
            "layers": args.layers if args.model is None else None,
            "model": args.model or "tiny llama (CLIP tokenizer)",
            "parameters": n_params,
        }
        summary["bench_wall_s"] = time.perf_counter() - started
        summary["runs"] = {"ours": ours, "trl": trl}
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()


def report(s: dict[str, Any]) -> None:
    st = s["settings"]
    print(
        f"settings: steps={st['steps']} warmup={st['warmup']} batch={st['batch_size']} max_length={st['max_length']} "
        f"threads={st['threads']} model={st['model']} hidden={st['hidden_size']} layers={st['layers']} "
        f"params={st['parameters']} lr={st['lr']} beta={st['beta']} trl_optim={st['trl_optim']} repeats={st['repeats']}"
    )
    print("step  ours_loss        trl_loss         abs_diff")
    for i, (a, b) in enumerate(zip(s["ours_losses"], s["trl_losses"], strict=False), start=1):
        print(f"{i:4d}  {a:.10f}  {b:.10f}  {abs(a - b):.3e}")
    tok = s["tokenization"]
    print(
        f"tokenization: batch {tok['batch_shape']}, {tok['completion_tokens']} completion tokens, match={tok['match']}"
    )
    for m in tok["mismatches"]:
        print(f"  mismatch row {m['row']} {m['key']}: trl={m['trl']} ours={m['ours']}")
    keys = [
        ("ours_step_s", "trl_step_s", "speed_ratio"),
        ("ours_inner_step_s", "trl_inner_step_s", "inner_speed_ratio"),
        ("ours_peak_rss_mib", "trl_peak_rss_mib", "rss_ratio"),
        ("ours_rss_before_train_mib", "trl_rss_before_train_mib"),
        ("ours_train_rss_increase_mib", "trl_train_rss_increase_mib"),
        ("ours_tokenize_collate_s", "measured_steps"),
        ("ours_first_loss", "trl_first_loss", "loss_max_abs_diff", "loss_steps_compared"),
        ("tokenization_match", "trl_optimizer", "bench_wall_s"),
    ]
    for group in keys:
        print(" ".join(f"{k}={_fmt(s[k])}" for k in group))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(Path(args.spec).read_text())
        result = worker_ours(spec) if args.worker == "ours" else worker_trl(spec)
        Path(args.result).write_text(json.dumps(result))
        return 0
    summary = bench(args)
    report(summary)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
