"""The loop every diffalign trainer shares: accelerate set-up, optimizer and schedule, gradient accumulation,
clipping, EMA, non-finite and weight guards, atomic verified checkpoints with exact resume (auto-resume by default:
:mod:`diffalign.trainers.resume`), and per-step metrics. docs/runs.md describes the outputs and the guards.

A method subclasses :class:`Trainer` and supplies only ``build`` (models and data), ``compute_loss`` (one
micro-batch → loss and metrics) and ``save_final`` (weights in a format diffusers loads back).
"""

from __future__ import annotations

import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    extract_model_from_parallel,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from diffalign.config import Config, config_to_dict, save_config
from diffalign.errors import DiffalignError
from diffalign.trainers.batching import EpochBatches
from diffalign.trainers.checkpointing import load_checkpoint, save_checkpoint
from diffalign.trainers.ema import load_ema, save_ema
from diffalign.trainers.loader import LoaderSettings, effective_workers, micro_batch_loader
from diffalign.trainers.metrics import MetricsWriter, run_name, tracker_init_kwargs
from diffalign.trainers.optimizers import build_optimizer
from diffalign.trainers.progress import StepProgress, count, format_summary
from diffalign.trainers.resume import choose_start
from diffalign.trainers.sharding import (
    SHARDED_DIR,
    fsdp2_settings,
    full_tensor,
    load_sharded,
    local_state_bytes,
    save_sharded,
    shard_model,
)

logger = logging.getLogger(__name__)


class TrainingStoppedError(DiffalignError):
    """A guard stopped the run. Nothing is saved from the bad state; the message names the last good checkpoint."""

    exit_code = 1


class NonFiniteLossError(TrainingStoppedError, RuntimeError):
    """``train.max_nonfinite_steps`` consecutive steps with a non-finite loss or gradient norm."""


class DivergedWeightsError(TrainingStoppedError):
    """The trained parameters became non-finite, or grew past ``train.max_weight_growth``."""


class TrainingInterrupted(DiffalignError):
    """Ctrl-C (SIGINT) during a run; the message says where it stopped and how to resume."""

    exit_code = 130


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    nonfinite_steps: int
    seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None  # the checkpoint's step when the run resumed


class Trainer(ABC):
    """Shared training loop. Subclasses set ``self.model`` (the module holding trainable parameters),
    ``self.dataset`` (indexable, with ``set_epoch``) and ``self.collate`` in :meth:`build`."""

    model: torch.nn.Module
    dataset: Any
    collate: Any

    def __init__(self, config: Config) -> None:
        self.config = config
        tc = config.train
        self.output_dir = Path(tc.output_dir)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=self.micro_batches_per_step(),
            mixed_precision=tc.mixed_precision,
            log_with=tc.report_to or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir)),
            kwargs_handlers=_process_group_kwargs(),
        )
        set_seed(tc.seed)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        self.ema: EMAModel | None = None
        self.fsdp2 = fsdp2_settings(self.accelerator)  # FSDP2 launch: the trainer shards and checkpoints by itself
        self.accelerator.register_save_state_pre_hook(self._save_trainable_only)
        self.accelerator.register_load_state_pre_hook(self._load_trainable_only)

    # -- what a method provides -------------------------------------------------------------------------------
    @abstractmethod
    def build(self) -> None: ...

    @abstractmethod
    def compute_loss(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the scalar loss of one local micro-batch and per-sample (or scalar) metric tensors to average."""

    @abstractmethod
    def save_final(self) -> None:
        """Write the trained weights the way diffusers / transformers load them back. Called on the main process
        only, except under FSDP2 (``self.fsdp2`` set), where every rank calls it to gather the shards."""

    def after_prepare(self) -> None:  # noqa: B027 - optional hook
        """Called once ``self.model`` is wrapped by accelerate (DDP, FSDP, ...)."""

    def micro_batches_per_step(self) -> int:
        """Backward passes per optimizer step (online RL: micro-batches × trained sampler steps)."""
        return self.config.train.gradient_accumulation_steps

    def micro_batch_stream(self, start: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(epoch, local batch) for the run's micro-batch ``start`` onwards: by default deterministic shuffled batches
        of ``self.dataset`` (:class:`EpochBatches`) read through a DataLoader with ``data.num_workers`` workers."""
        acc, tc, dc = self.accelerator, self.config.train, self.config.data
        batches = EpochBatches(
            len(self.dataset),
            tc.train_batch_size,
            num_processes=acc.num_processes,
            process_index=acc.process_index,
            seed=tc.seed,
        )
        settings = LoaderSettings(dc.num_workers, dc.pin_memory, dc.persistent_workers, dc.prefetch_factor)
        return micro_batch_loader(self.dataset, self.collate, batches, start, settings, acc.device)

    # -- shared machinery ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _save_trainable_only(self, models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        """Checkpoint only parameters that train (LoRA adapters, or the whole denoiser when fully fine-tuned), and the
        EMA of them as safetensors (:mod:`diffalign.trainers.ema`); frozen weights come back from the base model."""
        if self.accelerator.is_main_process:
            for i, model in enumerate(models):
                params = extract_model_from_parallel(model).named_parameters()
                state = {n: p.detach().contiguous() for n, p in params if p.requires_grad}
                save_file(state, str(Path(output_dir) / f"trainable_{i}.safetensors"))
            if self.ema is not None and self.fsdp2 is None:  # FSDP2: the EMA is in the sharded checkpoint
                save_ema(self.ema, self._trainable_names(), output_dir)
        weights.clear()

    def _load_trainable_only(self, models: list[torch.nn.Module], input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            module = extract_model_from_parallel(model)
            expected = {n for n, p in module.named_parameters() if p.requires_grad}
            if set(state) != expected:
                raise ValueError(
                    f"{input_dir}: checkpoint parameters do not match the model's trainable parameters "
                    f"({len(set(state) - expected)} unexpected, {len(expected - set(state))} missing); was it written "
                    "with different lora settings?"
                )
            module.load_state_dict(state, strict=False)
        if self.ema is not None and self.fsdp2 is None:
            load_ema(self.ema, self._trainable_names(), input_dir)
        models.clear()

    def _trainable_names(self) -> list[str]:
        """Names of the trained parameters, in :meth:`trainable_parameters` order (the EMA's order)."""
        return [n for n, p in extract_model_from_parallel(self.model).named_parameters() if p.requires_grad]

    def _build_optimizer(self) -> torch.optim.Optimizer:
        oc, tc = self.config.optim, self.config.train
        lr = oc.lr
        if oc.scale_lr:
            lr *= tc.train_batch_size * tc.gradient_accumulation_steps * self.accelerator.num_processes
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check lora.target_modules or lora.enabled")
        return build_optimizer(params, oc, lr)

    def _configure_distributed(self) -> None:
        """DeepSpeed: batch size and clipping from our config (no DataLoader goes through ``prepare``, and DeepSpeed
        clips with its own value). FSDP2: the trainer shards the model itself (:mod:`diffalign.trainers.sharding`),
        the same way on GPUs and CPUs; fp16 is refused there (accelerate's gradient scaler does not see a model kept
        out of ``prepare``)."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = self.config.train.train_batch_size
            ds["gradient_clipping"] = self.config.optim.max_grad_norm
        if self.fsdp2 is not None and acc.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision: fp16 is not supported under FSDP2; use bf16 (or no)")

    def _shard(self) -> None:
        """FSDP2: shard the policy and a frozen reference copy block by block, before the optimizer sees them."""
        shard_model(self.model, self.fsdp2)
        reference = getattr(self, "reference", None)
        frozen = reference.shardable_module() if reference is not None else None
        if frozen is not None:
            shard_model(frozen, self.fsdp2)

    def _save_shards(self, optimizer: torch.optim.Optimizer) -> Callable[[Path], None] | None:
        """FSDP2: what every rank writes into a checkpoint folder (trained parameters, optimizer state and EMA,
        sharded with torch.distributed.checkpoint); ``None`` otherwise (accelerate's ``save_state`` and our hooks)."""
        if self.fsdp2 is None:
            return None

        def write(folder: Path) -> None:
            save_sharded(folder / SHARDED_DIR, self.model, optimizer, extra=self._sharded_extra())

        return write

    def _sharded_extra(self) -> dict[str, Any] | None:
        return {"ema": self.ema.state_dict()} if self.ema is not None else None

    def _load_shards(self, checkpoint: Path, optimizer: torch.optim.Optimizer) -> None:
        extra = self._sharded_extra()
        load_sharded(checkpoint / SHARDED_DIR, self.model, optimizer, extra=extra)
        if extra is not None:
            self.ema.load_state_dict(extra["ema"])

    def _trainer_state(self, global_step: int, nonfinite: int) -> dict[str, Any]:
        state = {"global_step": global_step, "nonfinite_steps": nonfinite, "config": config_to_dict(self.config)}
        extra = self.extra_state()
        return {**state, "extra": extra} if extra else state

    def extra_state(self) -> dict[str, Any]:
        """A method's own small state for the checkpoint's JSON (MARBLE's coefficients); tensors go through
        :meth:`_save_trainable_only` as safetensors instead."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`extra_state` returned, when resuming."""

    # -- guards (collectives: every process calls them and gets the same answer) -------------------------------
    def _all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every process."""
        acc = self.accelerator
        flag = torch.isfinite(torch.as_tensor(value).detach()).all().reshape(1).to(acc.device)
        return bool(acc.gather(flag).all().item())

    def _max_abs(self, params: list[torch.nn.Parameter]) -> float:
        """max |w| over ``params`` across processes (FSDP2: over every rank's shards); NaN if any weight is NaN."""
        acc = self.accelerator
        local = [t for p in params if (t := (p.to_local() if isinstance(p, DTensor) else p).detach()).numel()]
        norms = torch._foreach_norm(local, ord=float("inf")) if local else []  # one fused kernel per dtype/device
        zero = torch.zeros((), device=acc.device)
        largest = torch.stack([n.float().to(acc.device) for n in norms]).max() if norms else zero
        return acc.gather(largest.reshape(1)).max().item()

    def _last_good(self) -> str:
        if self._last_checkpoint is None:
            return "no checkpoint was written before it"
        return f"last good checkpoint: {self._last_checkpoint}"

    def _nonfinite_stop(self, what: str, step: int, in_a_row: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{in_a_row} consecutive non-finite steps (the last, step {step}: non-finite {what}); training stopped "
            f"and nothing saved from this state ({self._last_good()}). Lower optim.lr or loss.beta, or check the data"
        )

    def _diverged(self, step: int) -> DivergedWeightsError:
        return DivergedWeightsError(
            f"step {step}: trained parameters are non-finite after the optimizer step; training stopped and nothing "
            f"saved from this state ({self._last_good()}). Lower optim.lr, or check optim.adam_epsilon and "
            "train.mixed_precision"
        )

    def _check_weights(self, trained: list[torch.nn.Parameter], step: int, what: str) -> None:
        """Refuse to write ``what`` (a checkpoint, the final weights) from trained parameters that are non-finite or
        larger than ``train.max_weight_growth`` x max(max |w| at step 0, 1)."""
        bound = self.config.train.max_weight_growth * max(self._initial_max_abs, 1.0)
        largest = self._max_abs(trained)
        if math.isfinite(largest) and largest <= bound:
            return
        raise DivergedWeightsError(
            f"step {step}: max |w| of the trained parameters is {largest:.3g}, over train.max_weight_growth x "
            f"max(max |w| at step 0, 1) = {bound:.3g}; {what} not written and training stopped ({self._last_good()}). "
            "Lower optim.lr, or raise train.max_weight_growth if the growth is expected"
        )

    def _reduce_metrics(self, sums: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        out = {}
        for name, values in sums.items():
            local = torch.cat([v.detach().float().reshape(-1) for v in values]).to(self.accelerator.device)
            gathered = self.accelerator.gather_for_metrics(local)
            out[name] = gathered.nanmean().item()  # NaN marks "not applicable to this sample" (e.g. KTO's classes)
        return out

    def _train_steps(
        self,
        micro: Iterator[tuple[int, dict[str, Any]]],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        writer: MetricsWriter,
        global_step: int,
        nonfinite_total: int,
    ) -> tuple[int, int, dict[str, float]]:
        """Optimizer steps from ``global_step`` to ``train.max_steps``; returns (steps, non-finite steps, last
        metrics). A step whose loss or gradient norm is non-finite is skipped and counted; ``max_nonfinite_steps`` in
        a row, parameters that turn non-finite, or a checkpoint of exploded weights stop the run with nothing saved
        from the bad state."""
        tc, acc = self.config.train, self.accelerator
        accumulation = self.micro_batches_per_step()
        trained = self.trainable_parameters()  # once: walking every parameter each step costs ~5 ms on a tiny UNet
        write_shards = self._save_shards(optimizer)
        # DDP: no gradient all-reduce before the last micro-batch. FSDP2: the model is not accelerate's, so its
        # gradients are reduce-scattered at every backward and stay sharded (sync on the last one only would hold
        # unsharded gradients between micro-batches)
        sync_models = (self.model,) if self.fsdp2 is None else ()
        # fp16's gradient scaler skips an overflowing step itself (and lowers the scale); DeepSpeed steps inside
        # backward, before the norm is known. Elsewhere a non-finite gradient norm skips the step here.
        skip_bad_gradients = acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED
        state_mib: torch.Tensor | None = None  # this process's parameters + gradients + optimizer state
        unlogged_state: list[torch.Tensor] = []
        consecutive_bad = 0
        last: dict[str, float] = {}
        progress = StepProgress(
            tc.max_steps, global_step, accumulation, enabled=tc.progress_bar and acc.is_local_main_process
        )
        self.model.train()
        try:
            while global_step < tc.max_steps:
                step_start = time.perf_counter()
                collected: dict[str, list[torch.Tensor]] = defaultdict(list)
                bad: str | None = None  # what was non-finite: "loss" or "gradient norm"
                for k in range(1, accumulation + 1):
                    epoch, batch = next(micro)
                    progress.micro_batch(k)
                    if bad:
                        continue  # keep the data position; the step is discarded anyway
                    with acc.accumulate(*sync_models):
                        loss, metrics = self.compute_loss(batch, epoch)
                        if not self._all_finite(loss):
                            bad = "loss"
                            continue
                        acc.backward(loss)
                    collected["loss"].append(loss.detach())
                    for name, value in metrics.items():
                        collected[name].append(value)
                global_step += 1
                if bad is None:
                    grad_norm = acc.clip_grad_norm_(trained, self.config.optim.max_grad_norm)
                    if grad_norm is not None:
                        grad_norm = full_tensor(torch.as_tensor(grad_norm))
                        collected["grad_norm"].append(grad_norm.detach().reshape(1))
                        if skip_bad_gradients and not self._all_finite(grad_norm):
                            bad = "gradient norm"
                if bad is not None:
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_total += 1
                    consecutive_bad += 1
                    logger.warning("non-finite %s at step %d: skipped (%d in a row)", bad, global_step, consecutive_bad)
                else:
                    consecutive_bad = 0
                    optimizer.step()
                    if not math.isfinite(self._max_abs(trained)):
                        raise self._diverged(global_step)
                    if state_mib is None:  # once, while gradients and optimizer state are both allocated
                        state_mib = torch.tensor([local_state_bytes(self.model, optimizer) / 2**20])
                        unlogged_state = [state_mib]
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if self.ema is not None:
                        self.ema.step(trained)
                stop = bad is not None and consecutive_bad >= tc.max_nonfinite_steps
                logged = global_step % tc.log_every == 0 or global_step == tc.max_steps or stop
                if logged:
                    if unlogged_state:  # logged with the first logged step (mean over processes)
                        collected["train_state_mib"], unlogged_state = unlogged_state, []
                    last = self._reduce_metrics(collected) if collected else {}
                    last.update(
                        learning_rate=lr_scheduler.get_last_lr()[0],
                        step_time_s=time.perf_counter() - step_start,
                        nonfinite_steps=nonfinite_total,
                        epoch=epoch,
                    )
                    writer.log(global_step, last)
                progress.step(last.get("loss", float("nan")) if logged else None)
                if stop:  # logged, not checkpointed
                    raise self._nonfinite_stop(bad, global_step, consecutive_bad)
                if global_step % tc.checkpointing_steps == 0 or global_step == tc.max_steps:
                    self._check_weights(trained, global_step, f"checkpoint-{global_step}")
                    self._last_checkpoint = save_checkpoint(
                        acc,
                        self.output_dir,
                        global_step,
                        self._trainer_state(global_step, nonfinite_total),
                        tc.checkpoints_total_limit,
                        write_shards=write_shards,
                    )
                self._step = global_step
        finally:
            progress.close()
        return global_step, nonfinite_total, last

    def summary_rows(self) -> list[tuple[str, str]]:
        """Rows of the start-up summary about the data and the batch; trainers extend or replace them."""
        tc, acc = self.config.train, self.accelerator
        accumulation = tc.gradient_accumulation_steps
        effective = tc.train_batch_size * accumulation * acc.num_processes
        epochs = tc.max_steps * effective / max(len(self.dataset), 1)
        rows = [
            ("examples", f"{len(self.dataset):,}"),
            ("batch per device", str(tc.train_batch_size)),
            ("accumulation", str(accumulation)),
            ("processes", f"{acc.num_processes} ({self._parallelism()})"),
            ("effective batch", str(effective)),
            ("optimizer steps", f"{tc.max_steps:,} ({epochs:.2f} epochs)"),
        ]
        if self.micro_batches_per_step() != accumulation:
            rows.append(("backward passes per step", str(self.micro_batches_per_step())))
        return rows

    def _parallelism(self) -> str:
        acc = self.accelerator
        if self.fsdp2 is not None:
            return "FSDP2, sharded by the trainer"
        if acc.distributed_type == DistributedType.DEEPSPEED:
            return f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage}"
        return "DDP" if acc.num_processes > 1 else "single process"

    def _workers_row(self) -> str:
        requested = self.config.data.num_workers
        used = effective_workers(self.dataset, requested) if hasattr(self, "dataset") else requested
        return str(used) if used == requested else f"{used} (cached data reads in place; data.num_workers={requested})"

    def start_up_summary(self, global_step: int, checkpoint: Path | None) -> str:
        """The block printed once by the main process before the first step."""
        tc, mc = self.config.train, self.config.model
        params = list(self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        kind = f"LoRA rank {self.config.lora.rank}" if self.config.lora.enabled else "full fine-tune"
        adapter = getattr(self, "adapter", None)
        rows = [
            ("model", f"{mc.pretrained}" + (f" ({type(adapter).__name__})" if adapter is not None else "")),
            *self.summary_rows(),
            ("trainable parameters", f"{count(trainable)} of {count(total)} ({kind})"),
            ("mixed precision", self.accelerator.mixed_precision),
            ("data loader workers", self._workers_row()),
        ]
        reference = getattr(self, "reference", None)
        if reference is not None:
            rows.append(("reference", reference.describe()))
        if checkpoint is not None:
            rows.append(("resumed from", f"step {global_step} ({checkpoint.name})"))
        rows.append(("output", str(self.output_dir)))
        title = f"Running training: {tc.method} ({type(self).__name__})"
        return format_summary(title, rows)

    def _choose_start(self) -> Path | None:
        """The checkpoint to resume from (:func:`~diffalign.trainers.resume.choose_start`, run on the main process,
        which reads and may clear the output folder); every process gets the same answer or raises the same error."""
        outcome: list[Any] = [None]
        if self.accelerator.is_main_process:
            try:
                outcome[0] = choose_start(self.config)
            except DiffalignError as err:
                outcome[0] = err
            except Exception as err:  # a bug or an OS error: raised here with its traceback, named to the others
                broadcast_object_list([RuntimeError(f"the main process failed to choose the start: {err!r}")])
                raise
        broadcast_object_list(outcome)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    def _interrupted(self) -> TrainingInterrupted:
        if self._last_checkpoint is None:
            return TrainingInterrupted(
                f"interrupted at step {self._step} (no checkpoint yet); rerun with train.overwrite_output_dir=true to "
                "start again"
            )
        again = (
            "resume with the same command"
            if self.config.train.resume_from_checkpoint in ("auto", "latest")
            else "resume with train.resume_from_checkpoint=auto"
        )
        return TrainingInterrupted(
            f"interrupted at step {self._step} (last checkpoint: {self._last_checkpoint.name}); {again}"
        )

    def train(self) -> TrainResult:
        """Run from the start :meth:`_choose_start` picks to ``train.max_steps``, then export the weights. Ctrl-C
        raises :class:`TrainingInterrupted` (DataLoader workers closed); a guard raises a
        :class:`TrainingStoppedError`."""
        started = time.perf_counter()
        self._step, self._last_checkpoint, self._initial_max_abs = 0, None, 0.0
        checkpoint = self._choose_start()  # before build: a refused start costs nothing
        try:
            return self._run(checkpoint, started)
        except KeyboardInterrupt:
            raise self._interrupted() from None

    def _run(self, checkpoint: Path | None, started: float) -> TrainResult:
        tc = self.config.train
        acc = self.accelerator
        self.build()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output_dir / "config.yaml")
        self._configure_distributed()
        if self.fsdp2 is not None:
            self._shard()
        optimizer = self._build_optimizer()
        lr_scheduler = get_scheduler(  # accelerate's scheduler steps once per process for each optimizer step
            self.config.optim.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=self.config.optim.warmup_steps * acc.num_processes,
            num_training_steps=tc.max_steps * acc.num_processes,
        )
        if self.fsdp2 is None:
            self.model, optimizer, lr_scheduler = acc.prepare(self.model, optimizer, lr_scheduler)
        else:  # a sharded model and its optimizer stay out of prepare (DDP would wrap them; see sharding.py)
            lr_scheduler = acc.prepare(lr_scheduler)
        self.after_prepare()
        if self.fsdp2 is not None:
            _reshard(self.model)
        if tc.ema:
            self.ema = EMAModel(self.trainable_parameters(), decay=tc.ema_decay)
            self.ema.to(acc.device)
        if tc.report_to and acc.is_main_process:
            acc.init_trackers(
                tc.tracker_project_name,
                config=_flatten(config_to_dict(self.config)),
                init_kwargs=tracker_init_kwargs(run_name(tc.run_name, tc.output_dir)),
            )
        self._initial_max_abs = self._max_abs(self.trainable_parameters())  # step 0's, also when resuming

        global_step, nonfinite_total = 0, 0
        if checkpoint is not None:
            state = load_checkpoint(acc, checkpoint)
            if self.fsdp2 is not None:
                self._load_shards(checkpoint, optimizer)
            global_step, nonfinite_total = state["global_step"], state["nonfinite_steps"]
            self.load_extra_state(state.get("extra", {}))
            self._step, self._last_checkpoint = global_step, checkpoint
            logger.info("resumed from %s at step %d", checkpoint, global_step)
        resumed_from = global_step if checkpoint is not None else None
        writer = MetricsWriter(acc, self.output_dir, resume_step=resumed_from)

        if acc.is_main_process:
            print(self.start_up_summary(global_step, checkpoint), flush=True)
        micro = self.micro_batch_stream(global_step * self.micro_batches_per_step())
        try:
            global_step, nonfinite_total, last = self._train_steps(
                micro, optimizer, lr_scheduler, writer, global_step, nonfinite_total
            )
        finally:
            _close(micro)
        acc.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.trainable_parameters())
        self._check_weights(self.trainable_parameters(), global_step, "the final weights")  # on every process
        if acc.is_main_process or self.fsdp2 is not None:  # FSDP2: every rank takes part in gathering the weights
            self.save_final()
        acc.wait_for_everyone()
        acc.end_training()
        seconds = time.perf_counter() - started
        return TrainResult(self.output_dir, global_step, nonfinite_total, seconds, last, resumed_from)


def _process_group_kwargs() -> list[InitProcessGroupKwargs]:
    """DeepSpeed without an accelerator (a CPU test run): accelerate picks no process-group backend there, so every
    process would believe it is rank 0 of 1; gloo is what DeepSpeed's CPU accelerator uses when oneCCL is absent. On
    GPUs accelerate's own choice (nccl) stands."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def _reshard(model: torch.nn.Module) -> None:
    """FSDP2: register the sharded parameters again. A no-grad forward before training (the precomputed reference
    pass) leaves the root unit unsharded, and ``model.parameters()`` would then list its unsharded parameters, whose
    storage FSDP2 frees at the next reshard, instead of the DTensors the optimizer steps."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _close(stream: Iterator[Any]) -> None:
    """Stop a micro-batch stream's DataLoader workers (or a generator) now, not at garbage collection."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
