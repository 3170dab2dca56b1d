"""The two-process half of tests/test_fsdp2.py, and the training recipe both halves share.

Launched as ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/fsdp2_worker.py BASE OUT`` on
CPUs (gloo): detects the FSDP2 request with :func:`~diffalign.trainers.sharding.fsdp2_settings`, then, for a full
fine-tune and for LoRA of the tiny UNet in the pipeline folder ``BASE``, trains :data:`STEPS` AdamW steps, writes a
sharded checkpoint after :data:`RESUME_AT` steps, resumes from it into freshly sharded objects and exports; last, one
LoRA step with bf16 compute and CPU offload. What the test compares is left in ``OUT`` (``results.json`` and
safetensors files, written by the main rank).

The single-process reference (:func:`train_reference`, run by the test) sees the same micro-batches: step ``s`` of
the two-process run gives rank ``r`` micro-batches ``(s, k, r)`` for ``k < ACCUMULATION``; the reference
accumulates all of them, ``k``-major, at the same micro-batch size.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from torch.distributed.tensor import DTensor

from diffalign.models.lora import add_lora
from diffalign.models.reference import adapters_disabled
from diffalign.trainers import sharding

WORLD = 2
BATCH = 2  # samples per micro-batch
# 2 processes x 2 micro-batches per step must equal 1 process x 4; the full fine-tune reduce-scatters every
# micro-batch's gradients (they stay sharded), LoRA only the last one's (set_requires_gradient_sync(False) before,
# as accelerate.accumulate does on GPUs)
ACCUMULATION = 2
SYNC_EVERY_MICRO_BATCH = {"full": True, "lora": False}
MODES = tuple(SYNC_EVERY_MICRO_BATCH)
STEPS = 3
RESUME_AT = 2
LR, WEIGHT_DECAY, MAX_GRAD_NORM, EMA_DECAY = 1e-3, 1e-2, 0.5, 0.9
# AdamW's default eps 1e-8 turns gradients at float-noise level into lr-sized steps of random sign: the tiny UNet has
# parameters whose gradient is analytically zero (a conv bias right before a one-channel-per-group GroupNorm, measured
# |grad| ~3e-9), and FSDP2 changes gradients by a few ulps (see test_fsdp2.py), so with eps 1e-8 weights after 3 steps
# differed by up to 1.3e-4 for reasons unrelated to sharding. With eps 1e-4 an update moves at most about
# lr * gradient error / eps, which keeps the weight comparison as sharp as the gradient one.
ADAM_EPS = 1e-4
LORA_RANK, LORA_SEED = 4, 7

Batch = dict[str, torch.Tensor]


def sample(index: int) -> Batch:
    """Fixed data of sample ``index``: 4×8×8 latents, a timestep, 4 context tokens of width 32, a target."""
    g = torch.Generator().manual_seed(1000 + index)
    return {
        "x": torch.randn(4, 8, 8, generator=g),
        "t": torch.randint(0, 1000, (), generator=g),
        "c": torch.randn(4, 32, generator=g),
        "target": torch.randn(4, 8, 8, generator=g),
    }


def micro_batch(step: int, micro: int, rank: int) -> Batch:
    first = ((step * ACCUMULATION + micro) * WORLD + rank) * BATCH
    samples = [sample(i) for i in range(first, first + BATCH)]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def load_policy(base: Path, mode: str) -> tuple[UNet2DConditionModel, UNet2DConditionModel | None]:
    """(policy, frozen reference copy or ``None``): the base UNet fully trainable with a frozen copy (``full``), or
    frozen with a LoRA adapter whose reference is the same network with adapters disabled (``lora``)."""
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    if mode == "full":
        return unet.requires_grad_(True), copy.deepcopy(unet).requires_grad_(False)
    torch.manual_seed(LORA_SEED)  # peft's gaussian init of the A matrices draws from the global RNG
    add_lora(unet, rank=LORA_RANK)
    return unet, None


def trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trained_names(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, EMAModel]:
    params = trained(model)
    optimizer = torch.optim.AdamW(params, lr=LR, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    return optimizer, EMAModel(params, decay=EMA_DECAY)


def micro_loss(model: torch.nn.Module, frozen: torch.nn.Module | None, batch: Batch) -> torch.Tensor:
    """A denoising loss plus a pull towards the reference's prediction (computed without grad, as the preference
    losses do): runs the policy and either kind of reference under FSDP2."""
    args = (batch["x"], batch["t"], batch["c"])
    with torch.no_grad(), adapters_disabled(model) if frozen is None else nullcontext():
        reference = (model if frozen is None else frozen)(*args).sample
    prediction = model(*args).sample
    return (prediction - batch["target"]).pow(2).mean() + (prediction - reference).pow(2).mean()


def torch_clip(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)


def train_steps(
    model: torch.nn.Module,
    frozen: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    ema: EMAModel,
    steps: range,
    micro_batches: Callable[[int], list[Batch]],
    *,
    before_micro_batch: Callable[[int, int], None] = lambda k, n: None,
    clip: Callable[[list[torch.nn.Parameter]], torch.Tensor] = torch_clip,
    after_step: Callable[[], None] = lambda: None,
) -> Iterator[tuple[list[float], float]]:
    """Yield (micro-batch losses, total gradient norm before clipping) per step. Each micro-batch loss is divided by
    the number of micro-batches (as ``accelerator.backward`` does); ``after_step`` runs before ``zero_grad``."""
    params = trained(model)
    for step in steps:
        batches = micro_batches(step)
        losses = []
        for k, batch in enumerate(batches):
            before_micro_batch(k, len(batches))
            loss = micro_loss(model, frozen, batch)
            (loss / len(batches)).backward()
            losses.append(loss.item())
        norm = clip(params)
        optimizer.step()
        ema.step(params)
        after_step()
        optimizer.zero_grad(set_to_none=True)
        yield losses, float(norm)


def one_process_batches(step: int) -> list[Batch]:
    """Every rank's micro-batches of ``step``, in the order one process accumulates them."""
    return [micro_batch(step, k, r) for k in range(ACCUMULATION) for r in range(WORLD)]


def train_reference(base: Path, mode: str) -> dict[str, Any]:
    """One process, no sharding: the run the two-process one must equal."""
    model, frozen = load_policy(base, mode)
    optimizer, ema = build_optimizer(model)
    measured: list[int] = []

    def measure() -> None:
        measured.append(sharding.local_state_bytes(model, optimizer))

    records = list(train_steps(model, frozen, optimizer, ema, range(STEPS), one_process_batches, after_step=measure))
    return {
        "model": model,
        "losses": [losses for losses, _ in records],
        "grad_norms": [norm for _, norm in records],
        "state_bytes": measured[-1],
        "ema": {n: s.detach().clone() for n, s in zip(trained_names(model), ema.shadow_params, strict=True)},
    }


# -- the two-process run --------------------------------------------------------------------------------------------


class ShardedRun:
    """One mode's sharded policy (and frozen copy), optimizer and EMA on this rank, built as the trainer would: load,
    attach LoRA, shard, then optimizer and EMA over the DTensor parameters."""

    def __init__(self, accelerator: Any, settings: sharding.Fsdp2Settings, base: Path, mode: str) -> None:
        self.accelerator, self.mode = accelerator, mode
        self.model, self.frozen = load_policy(base, mode)
        sharding.shard_model(self.model, settings)
        if self.frozen is not None:
            sharding.shard_model(self.frozen, settings)
        self.optimizer, self.ema = build_optimizer(self.model)

    def train(self, steps: range, after_step: Callable[[], None] = lambda: None) -> list[tuple[list[float], float]]:
        rank = self.accelerator.process_index

        def local(step: int) -> list[Batch]:
            return [micro_batch(step, k, rank) for k in range(ACCUMULATION)]

        def gradient_sync(k: int, n: int) -> None:
            self.model.set_requires_gradient_sync(SYNC_EVERY_MICRO_BATCH[self.mode] or k == n - 1)

        def clip(params: list[torch.nn.Parameter]) -> torch.Tensor:
            return sharding.full_tensor(self.accelerator.clip_grad_norm_(params, MAX_GRAD_NORM))

        run = train_steps(
            self.model,
            self.frozen,
            self.optimizer,
            self.ema,
            steps,
            local,
            before_micro_batch=gradient_sync,
            clip=clip,
            after_step=after_step,
        )
        return list(run)

    def save(self, directory: Path) -> None:
        sharding.save_sharded(directory, self.model, self.optimizer, extra={"ema": self.ema.state_dict()})

    def load(self, directory: Path) -> None:
        ema_state = self.ema.state_dict()
        sharding.load_sharded(directory, self.model, self.optimizer, extra={"ema": ema_state})
        self.ema.load_state_dict(ema_state)

    def local_tensors(self) -> list[torch.Tensor]:
        """Trained parameters, EMA shadows and AdamW moments: what a resumed run must reproduce."""
        moments = [s[key] for s in self.optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
        return [t.to_local() for t in (*trained(self.model), *self.ema.shadow_params, *moments)]


def run_mode(accelerator: Any, settings: sharding.Fsdp2Settings, base: Path, out: Path, mode: str) -> dict[str, Any]:
    import torch.distributed as dist
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    checkpoint = out / f"{mode}_checkpoint"
    run = ShardedRun(accelerator, settings, base, mode)
    measured: list[int] = []
    records = run.train(range(RESUME_AT))
    run.save(checkpoint)
    records += run.train(
        range(RESUME_AT, STEPS), lambda: measured.append(sharding.local_state_bytes(run.model, run.optimizer))
    )

    resumed = ShardedRun(accelerator, settings, base, mode)
    resumed.load(checkpoint)
    resumed_records = resumed.train(range(RESUME_AT, STEPS))
    pairs = zip(run.local_tensors(), resumed.local_tensors(), strict=True)
    resume_diff = torch.tensor(max((a - b).abs().max().item() for a, b in pairs))
    dist.all_reduce(resume_diff, op=dist.ReduceOp.MAX)

    mismatch = ""
    if mode == "lora":  # the full fine-tune's checkpoint, written earlier, into a LoRA model
        try:
            sharding.load_sharded(out / "full_checkpoint", resumed.model, resumed.optimizer)
        except ValueError as error:
            mismatch = str(error)

    shadows = zip(trained_names(run.model), run.ema.shadow_params, strict=True)
    ema = {name: sharding.full_tensor(shadow.detach()) for name, shadow in shadows}
    state = sharding.gather_full_state_dict(run.model, trainable_only=mode == "lora")
    if mode == "full":
        sharding.export_denoiser(run.model, out / "full_export" / "unet")
    else:
        sharding.export_lora(run.model, out / "lora_export", pipeline_cls=StableDiffusionPipeline)
    frozen_params = [] if run.frozen is None else list(run.frozen.parameters())
    per_rank: list[Any] = [None] * WORLD
    dist.all_gather_object(
        per_rank,
        {
            "losses": [losses for losses, _ in records],
            "resumed_losses": [losses for losses, _ in resumed_records],
            "state_bytes": measured[-1],
            "frozen_all_dtensor": all(isinstance(p, DTensor) for p in frozen_params),
            "frozen_grads": sum(p.grad is not None for p in frozen_params),
            "frozen_parameters": len(frozen_params),
        },
    )
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{mode}_state.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.items()}, str(out / f"{mode}_ema.safetensors"))
    return {
        "ranks": per_rank,
        "grad_norms": [norm for _, norm in records],
        "resumed_grad_norms": [norm for _, norm in resumed_records],
        "resume_max_abs_diff": resume_diff.item(),
        "mismatch_error": mismatch,
    }


def mixed_precision_step(accelerator: Any, settings: sharding.Fsdp2Settings, base: Path) -> dict[str, Any]:
    """One LoRA step as the trainer sets LoRA up under bf16 (frozen base weights in bf16, adapters in fp32, both in
    each block's group), sharded with bf16 compute, fp32 gradient reduction and CPU offload."""
    settings = dataclasses.replace(settings, param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cpu_offload=True)
    model, _ = load_policy(base, "lora")
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    sharding.shard_model(model, settings)
    optimizer, _ = build_optimizer(model)
    loss = micro_loss(model, None, micro_batch(0, 0, accelerator.process_index))
    loss.backward()
    grad_dtypes = sorted({str(p.grad.dtype) for p in trained(model)})
    optimizer.step()
    return {
        "loss": loss.item(),
        "trained_dtypes": sorted({str(p.dtype) for p in trained(model)}),
        "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
        "grad_dtypes": grad_dtypes,
        "devices": sorted({p.to_local().device.type for p in model.parameters()}),
    }


def main(base: Path, out: Path) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator()
    settings = sharding.fsdp2_settings(accelerator)
    results: dict[str, Any] = {
        "distributed_type": str(accelerator.distributed_type),
        "state_has_fsdp_plugin": hasattr(accelerator.state, "fsdp_plugin"),
        "settings": None if settings is None else {k: str(v) for k, v in vars(settings).items()},
    }
    for mode in MODES:
        started = time.perf_counter()
        results[mode] = run_mode(accelerator, settings, base, out, mode)
        results[mode]["seconds"] = time.perf_counter() - started
    results["bf16_offload"] = mixed_precision_step(accelerator, settings, base)
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
