"""``diffalign evidence llm``: DPO, PRO and GRPO trained from the same pretrained toy LM with their
``configs/toy/llm_*.yaml``, judged on sampled completions of every evaluation prompt (gold = the property rate: the
completion names the prompted colour; also the graded gold score and diversity).

Data is on-policy, from the base model's own samples judged by the gold score (:mod:`diffalign.toy.llm_data`):
DPO gets best-vs-worst pairs, PRO rankings of 4 scored samples, GRPO only prompts and the gold score as its reward.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.toy.configs import toy_run_config
from diffalign.toy.llm_data import write_preference_pairs, write_prompts, write_rankings
from diffalign.toy.llm_model import load_toy_lm, property_rate
from diffalign.toy.llm_pretrain import ensure_llm_base
from diffalign.toy.llm_world import gold_score
from diffalign.toy.reports import chosen_methods, write_report

LLM_METHODS = ("llm_dpo", "llm_pro", "llm_grpo")
DATA_VERSION = 1  # bump when the data writers change what they write
_LAYOUT_OF_METHOD = {"llm_dpo": "pairs", "llm_pro": "rankings", "llm_grpo": "prompts"}


def gold_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
    """The toy world's graded gold score as a GRPO reward function (TRL's signature)."""
    return [gold_score(p, c) for p, c in zip(prompts, completions, strict=True)]


@dataclass
class LLMWorld:
    base: Path
    data: dict[str, Path]
    workdir: Path


def prepare_llm_world(workdir: str | os.PathLike, *, n_prompts: int = 600, seed: int = 0) -> LLMWorld:
    """The pretrained toy LM and, written once, its on-policy pairs, rankings and prompts (``n_prompts`` each)."""
    workdir = Path(workdir)
    base = ensure_llm_base()
    folder = workdir / "data"
    writers = {
        "pairs": lambda p: write_preference_pairs(p, base, n_prompts, seed),
        "rankings": lambda p: write_rankings(p, base, n_prompts, seed),
        "prompts": lambda p: write_prompts(p, n_prompts, seed),
    }
    data = {}
    for layout, write in writers.items():
        path = folder / f"{layout}-v{DATA_VERSION}-{n_prompts}-seed{seed}.jsonl"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            write(tmp)
            os.replace(tmp, path)
        data[layout] = path
    return LLMWorld(base=base, data=data, workdir=workdir)


def llm_method_config(method: str, world: LLMWorld, overrides: Sequence[str] = ()) -> Any:
    data = world.data[_LAYOUT_OF_METHOD[method]]
    return toy_run_config(method, world.base, data, world.workdir / "runs" / method, overrides)


def train_llm_method(method: str, world: LLMWorld, overrides: Sequence[str] = ()) -> tuple[Path, float]:
    from diffalign.trainers.run import train

    config = llm_method_config(method, world, overrides)
    started = time.perf_counter()
    result = train(config)
    return result.output_dir, time.perf_counter() - started


def load_trained_lm(base: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """The base, or a run's result: a peft adapter folder (merged into the base) or full ``save_pretrained``
    weights."""
    if run_dir is None:
        return load_toy_lm(base)
    run_dir = Path(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer = load_toy_lm(base)
        return PeftModel.from_pretrained(model, run_dir).merge_and_unload().eval(), tokenizer
    return load_toy_lm(run_dir)


def evaluate_llm(base: Path, run_dir: Path | None = None, *, n_per_prompt: int = 16, seed: int = 1234) -> dict:
    model, tokenizer = load_trained_lm(base, run_dir)
    return property_rate(model, tokenizer, n_per_prompt=n_per_prompt, seed=seed)


def run_llm_evidence(
    output_dir: str | os.PathLike | None = None,
    *,
    methods: Sequence[str] | None = None,
    n_per_prompt: int = 16,
    overrides: Sequence[str] = (),
) -> dict:
    """Train and judge ``methods`` (default: all); write ``report.json``, ``report.md`` and ``samples.md``."""
    methods = chosen_methods(methods, tuple(LLM_METHODS), "llm")
    output_dir = Path(output_dir or "outputs/evidence/llm")
    world = prepare_llm_world(output_dir)
    for method in methods:  # fail on a bad override before any training
        llm_method_config(method, world, overrides)
    before = evaluate_llm(world.base, n_per_prompt=n_per_prompt)
    report: dict = {
        "world": {
            "family": "llm",
            "base": str(world.base),
            "data": {k: str(v) for k, v in world.data.items()},
            "samples_per_evaluation": len(before["samples"]),
        },
        "methods": {},
    }
    samples = {"base": before["samples"]}
    for method in methods:
        run_dir, seconds = train_llm_method(method, world, overrides)
        after = evaluate_llm(world.base, run_dir, n_per_prompt=n_per_prompt)
        report["methods"][method] = {
            "gold_before": before["property_rate"],
            "gold_after": after["property_rate"],
            "gold_score_before": before["gold_score"],
            "gold_score_after": after["gold_score"],
            "diversity_before": before["diversity"],
            "diversity_after": after["diversity"],
            "shape_rate_after": after["shape_rate"],
            "seconds": seconds,
        }
        samples[method] = after["samples"]
        _write(output_dir, report, samples, n_per_prompt)
    return report


def _write(output_dir: Path, report: dict, samples: dict[str, list], n_per_prompt: int) -> None:
    write_report(output_dir, report, format_llm_report)
    lines = ["# First sample of every fourth prompt", ""]
    prompts = [p for p, _ in samples["base"][::n_per_prompt]][::4]
    lines += ["| prompt | " + " | ".join(samples) + " |", "|---|" + "---|" * len(samples)]
    for prompt in prompts:
        firsts = [next(c for p, c in rows if p == prompt) for rows in samples.values()]
        lines.append(f"| {prompt} | " + " | ".join(c.replace("|", "/") for c in firsts) + " |")
    (output_dir / "samples.md").write_text("\n".join(lines) + "\n")


def format_llm_report(report: dict) -> str:
    world = report["world"]
    lines = [
        f"Toy LLM world, {world['samples_per_evaluation']} sampled completions per evaluation (gold = property rate: "
        "the completion names the prompted colour; gold score = 0.5·colour + 0.3·shape + 0.2·well formed).",
        "",
        "| method | gold before | gold after | change | gold score before | gold score after | diversity before | "
        "diversity after | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        change = 100 * (m["gold_after"] - m["gold_before"])
        lines.append(
            f"| {name} | {m['gold_before']:.3f} | {m['gold_after']:.3f} | {change:+.1f} pts | "
            f"{m['gold_score_before']:.3f} | {m['gold_score_after']:.3f} | {m['diversity_before']:.3f} | "
            f"{m['diversity_after']:.3f} | {m['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"
