"""The measurement: a priming run of every contender, then short and long runs in fresh subprocesses, repeated and
interleaved, and their per-step wall and CPU seconds (difference method), fixed cost and peak RSS."""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Sequence
from typing import Any

from diffalign.utils.benchmark import ProcessRun, per_step_seconds, run_measured

from .common import Contender, Settings


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
