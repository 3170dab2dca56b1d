"""``diffalign evidence flux``: a smoke run of Diffusion-DPO and Flow-GRPO on a tiny FLUX.1-dev built from configs.

Not an effect measurement (the embedded toy world stays the SD3-style flow toy): it shows that the loops run on the
FLUX backbone end to end, through the same ``diffalign.trainers.run.train`` a real run takes, from a pipeline folder
saved with ``save_pretrained`` and loaded back through ``from_pretrained``. Diffusion-DPO trains on random image pairs
(``diffalign.data.synthetic``), Flow-GRPO on four prompts with the JPEG-compressibility reward (no model to download),
both LoRA, the guidance embedding at 3.5 and no CFG. The report lists each method's steps, losses, whether they are
all finite and its wall time; ``report.json`` / ``report.md`` are written to the output folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffalign.config import load_config
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.models.tiny_flux import save_tiny_flux_pipeline
from diffalign.toy.configs import overrides_for
from diffalign.toy.reports import chosen_methods
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.run import train

FLUX_METHODS = ("dpo", "flow_grpo")
PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow star")
_COMMON = (
    "data.resolution=32",
    "model.max_sequence_length=32",
    "lora.rank=4",
    "optim.lr=1e-3",
    "train.max_steps=2",
    "train.train_batch_size=2",
    "train.checkpointing_steps=2",
    "train.progress_bar=false",
)
_METHOD_OVERRIDES = {
    "dpo": ("train.method=dpo", "loss.beta=100"),
    "flow_grpo": (
        "train.method=grpo",
        "online.reward_functions=[jpeg_compressibility]",
        "online.sample_steps=3",
        "online.guidance_scale=1.0",
        "online.num_generations=2",
        "online.prompts_per_rollout=2",
        "online.timestep_fraction=0.67",
    ),
}


def run_flux_evidence(
    output_dir: str | os.PathLike = "outputs/evidence/flux",
    *,
    methods: Sequence[str] | None = None,
    n_per_prompt: int = 16,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Train each of ``methods`` (``dpo``, ``flow_grpo``) two steps on a tiny FLUX.1-dev; ``n_per_prompt`` is
    unused (kept for the command's common arguments)."""
    methods = chosen_methods(methods, tuple(FLUX_METHODS), "flux")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny_flux"
    if not (model / "model_index.json").is_file():
        save_tiny_flux_pipeline(model)
    pairs, prompts = out / "pairs.parquet", out / "prompts.txt"
    write_pickapic_parquet(pairs, make_random_pairs(8, size=32, seed=0))
    prompts.write_text("\n".join(PROMPTS) + "\n")
    (out / "empty.yaml").write_text("{}\n")
    results: dict[str, Any] = {}
    for method in methods:
        run_dir = out / method
        data = pairs if method == "dpo" else prompts
        started = time.perf_counter()
        config = load_config(
            out / "empty.yaml",
            [
                f"model.pretrained={model}",
                f"data.path={data}",
                f"train.output_dir={run_dir}",
                "train.overwrite_output_dir=true",
                *_COMMON,
                *_METHOD_OVERRIDES[method],
                *overrides_for(method, overrides),
            ],
        )
        result = train(config)
        losses = [float(r["loss"]) for r in read_metrics(run_dir)]
        results[method] = {
            "steps": result.global_step,
            "losses": losses,
            "finite": bool(losses) and all(math.isfinite(v) for v in losses),
            "seconds": round(time.perf_counter() - started, 2),
        }
    report = {"backbone": "flux (tiny FLUX.1-dev from configs)", "methods": results}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_flux_report(report) + "\n")
    return report


def format_flux_report(report: dict[str, Any]) -> str:
    """The report as a markdown table: method, steps, losses, all finite, seconds."""
    lines = [
        f"FLUX smoke run: {report['backbone']}",
        "",
        "| method | steps | losses | finite | seconds |",
        "|---|---|---|---|---|",
    ]
    for method, r in report["methods"].items():
        losses = ", ".join(f"{v:.4f}" for v in r["losses"])
        lines.append(f"| {method} | {r['steps']} | {losses} | {'yes' if r['finite'] else 'NO'} | {r['seconds']} |")
    return "\n".join(lines)
