"""Full fine-tuning without a second network: the reference model as stored numbers, or as a CPU-offloaded copy.

Diffusion-DPO and its variants compare the policy's denoising log-likelihood surrogate with the reference model's at
the SAME per-sample draw (noise ε, timestep t, flips, prompt dropout), and every draw comes from
(seed, epoch, sample index) (``diffalign.utils.randomness``). The reference is frozen, so its value for sample ``i``
in epoch ``e`` is a fixed number: it can be computed once, before training, with the initial weights, and looked up
afterwards. Training then holds only the policy (``train.reference=precomputed``).

What is stored (``ReferenceLogpStore``): one folder per key (see :func:`reference_key`), holding ``manifest.json``
(the key's inputs, for humans) and ``epoch-EEEEE.safetensors`` with ``chosen`` and ``rejected``, float32 of shape
``(N,)`` (N = pairs in the data set): the reference (winner, loser) log-likelihood surrogates
``logp = -0.5 · MSE`` of pair ``i`` in epoch ``e``, UNWEIGHTED (a timestep weighting ω(t) is applied at read time,
exactly as on the live path, so ``loss.weighting`` / ``loss.snr_gamma`` are not part of the key), and ``computed``,
uint8 ``(N,)``, 1 where a value is stored (a non-finite value is stored as it is: the training step that reads it
is skipped by the non-finite guard, as with a live reference). Reading an index not computed raises
:class:`MissingReferenceError`. Files are written to a temporary name and moved into place with ``os.replace`` (a
crash never leaves a half-written epoch), merging with what is on disk, so two runs sharing a store never lose each
other's values.

Where (``OfflinePreferenceTrainer``): beside the latent cache, ``<data.cache_dir>/<cache key>/reference/<key>/``,
when one is used (runs with the same model, data and seed share the values), else
``<train.output_dir>/reference_logps/<key>/`` (a resumed run finds them there).

How they are computed (:func:`precompute_reference_logps`): for every micro-batch the run will touch
(``max_steps × gradient_accumulation_steps`` global micro-batches, :func:`plan_micro_batches`), in the training order
and with the training batch composition, one no-grad forward of the live reference's own inputs and forward with the
initial weights (the trainer's reference pass, :class:`diffalign.trainers.reference.PrecomputedReference`). Every
process computes its own share; process 0 gathers and writes the values. Same batches as the live reference forward
means the same floating-point sums, so precomputed training equals frozen-copy training bit for bit on one device,
and 2 processes store exactly what 1 process with 2 accumulation steps stores (tests); a store reused by a run with
another batch layout differs only by float rounding. The pass costs exactly the reference forwards that training
would have run, once.

:func:`offloaded_frozen_copy` is the other way to drop the second network from the device: the frozen copy lives in
CPU memory and ``accelerate.cpu_offload`` streams each submodule's weights to the execution device for its forward.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffalign.errors import DiffalignError
from diffalign.trainers.batching import EpochBatches
from diffalign.utils.modules import move_module

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TENSORS = {"chosen": torch.float32, "rejected": torch.float32, "computed": torch.uint8}

#: One local micro-batch of the training plan: (epoch, dataset indices).
PlannedBatch = tuple[int, list[int]]
#: Computes the reference (chosen, rejected) log-likelihood surrogates of one planned batch; each (B,) float32.
ComputeReference = Callable[[int, list[int]], tuple[torch.Tensor, torch.Tensor]]


class MissingReferenceError(DiffalignError, RuntimeError):
    """A precomputed reference value was requested that the store does not hold."""


# ------------------------------------------------------------------------------------------------------ the key


def weights_fingerprint(pretrained: str, revision: str | None = None, variant: str | None = None) -> str:
    """Identity of every weight and config file of a model: for a local folder, the relative path, size and mtime (ns)
    of each file under it (denoiser, VAE, text encoders, tokenizers, scheduler; any backbone layout); for a hub id,
    the id, revision and variant (pin a ``revision`` for a store that cannot go stale)."""
    parts: list[str] = [str(pretrained), str(revision), str(variant)]
    root = Path(pretrained).expanduser()
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
            stat = path.stat()
            parts.append(f"{path.relative_to(root).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def reference_key(parts: Mapping[str, Any]) -> str:
    """Folder name of a store: a hash of everything its values depend on (``parts`` must be JSON-serialisable).

    The trainer passes: the store format, the weights fingerprint, backbone and prediction type, the data fingerprint
    (source, loading options, resolution, crop mode, flips), prompt dropout, cached or not, the seed, method, mixed
    precision and where the reference comes from (initial weights, or LoRA adapters disabled). The epoch is the file
    name inside the folder.
    """
    blob = json.dumps({"format": STORE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------------- the store


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ReferenceLogpStore:
    """Per-epoch reference log-likelihood surrogates of every pair, on disk (see the module docstring).

    Args:
        folder: the store's folder (created if missing).
        num_samples: pairs in the data set, N.
        key_parts: the inputs of the folder's key, written to ``manifest.json`` on creation.
    """

    def __init__(self, folder: str | os.PathLike, num_samples: int, key_parts: Mapping[str, Any] | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: a store needs at least one pair")
        self.folder = Path(folder)
        self.num_samples = num_samples
        self._epochs: dict[int, dict[str, torch.Tensor]] = {}
        self._dirty: set[int] = set()
        manifest_path = self.folder / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("num_samples") != num_samples:
                raise ValueError(
                    f"{self.folder}: store holds {manifest.get('num_samples')} pairs, the data set has {num_samples}; "
                    "delete the folder to recompute it"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            manifest = {
                "format_version": STORE_FORMAT_VERSION,
                "num_samples": num_samples,
                "values": "reference logp = -0.5 * per-sample MSE, unweighted, float32; computed: 1 = stored",
                "key_parts": dict(key_parts or {}),
            }
            tmp = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            os.replace(tmp, manifest_path)

    def epoch_path(self, epoch: int) -> Path:
        """File of ``epoch``'s values."""
        return self.folder / f"epoch-{epoch:05d}.safetensors"

    def _read(self, epoch: int) -> dict[str, torch.Tensor] | None:
        path = self.epoch_path(epoch)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            values = {name: f.get_tensor(name) for name in _TENSORS}
        for name, dtype in _TENSORS.items():
            t = values[name]
            if t.shape != (self.num_samples,) or t.dtype != dtype:
                raise ValueError(
                    f"{path}: '{name}' is {t.dtype} {tuple(t.shape)}, expected {dtype} ({self.num_samples},); delete "
                    "the store folder to recompute it"
                )
        return values

    def _values(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch not in self._epochs:
            found = self._read(epoch)
            if found is None:
                found = {name: torch.zeros(self.num_samples, dtype=dtype) for name, dtype in _TENSORS.items()}
            self._epochs[epoch] = found
        return self._epochs[epoch]

    def missing(self, epoch: int, indices: Iterable[int]) -> list[int]:
        """The ``indices`` whose values for ``epoch`` are not stored yet."""
        index = torch.as_tensor([int(i) for i in indices], dtype=torch.long)
        return index[self._values(epoch)["computed"][index] == 0].tolist()

    def put(self, epoch: int, indices: Sequence[int], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Record values (kept in memory until :meth:`flush`); ``chosen`` / ``rejected`` have shape (len(indices),)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        for name, t in (("chosen", chosen), ("rejected", rejected)):
            if t.shape != (len(index),):
                raise ValueError(f"{name}: expected shape ({len(index)},), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                logger.warning(
                    "non-finite reference %s log-likelihood in epoch %d, indices %s: stored; the training step that "
                    "reads it will be skipped as non-finite",
                    name,
                    epoch,
                    index.tolist(),
                )
        values = self._values(epoch)
        values["chosen"][index] = chosen.detach().float().cpu()
        values["rejected"][index] = rejected.detach().float().cpu()
        values["computed"][index] = 1
        self._dirty.add(epoch)

    def flush(self) -> None:
        """Write every epoch with unwritten values, atomically, merged with values another writer put on disk."""
        for epoch in sorted(self._dirty):
            mine = self._epochs[epoch]
            disk = self._read(epoch)
            if disk is not None:
                theirs = (disk["computed"] == 1) & (mine["computed"] == 0)
                for name in _TENSORS:
                    mine[name] = torch.where(theirs, disk[name], mine[name])
            _atomic_save(
                {name: t.contiguous() for name, t in mine.items()},
                self.epoch_path(epoch),
                metadata={"epoch": str(epoch), "format_version": str(STORE_FORMAT_VERSION)},
            )
        self._dirty.clear()

    def get(self, epoch: int, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (chosen, rejected) values of ``indices`` in ``epoch``, float32 (len(indices),) on the CPU.

        Raises:
            MissingReferenceError: some value was never computed.
        """
        index = torch.as_tensor(list(indices), dtype=torch.long)
        bad = self._values(epoch)["computed"][index] == 0
        if bad.any() and epoch not in self._dirty:
            self._epochs.pop(epoch, None)  # the file may have been completed by another process since it was read
            bad = self._values(epoch)["computed"][index] == 0
        if bad.any():
            raise MissingReferenceError(
                f"{self.epoch_path(epoch)}: no precomputed reference log-likelihood for epoch {epoch}, pair indices "
                f"{index[bad].tolist()}. The values are computed before training from the initial weights; a run that "
                "reaches samples its precompute pass did not plan (more steps, another batch layout) cannot compute "
                "them after the weights changed. Restart from the initial weights (the pass fills the gaps), or use "
                "train.reference=frozen_copy"
            )
        values = self._values(epoch)
        return values["chosen"][index], values["rejected"][index]


# ------------------------------------------------------------------------------------------------ the precompute


def plan_micro_batches(
    num_samples: int, batch_size: int, *, num_processes: int, seed: int, num_micro_batches: int
) -> list[PlannedBatch]:
    """Every process's local batch of global micro-batches ``0 .. num_micro_batches - 1``, in training order.

    Uses :class:`EpochBatches` with the trainer's arguments, so the list is exactly what the processes of the run
    will draw (process 0's batch of a micro-batch first).
    """
    per_process = [
        EpochBatches(num_samples, batch_size, num_processes=num_processes, process_index=p, seed=seed)
        for p in range(num_processes)
    ]
    return [batches.local_indices(k) for k in range(num_micro_batches) for batches in per_process]


def planned_epochs(plan: Iterable[PlannedBatch]) -> list[int]:
    """The epochs a plan touches, ascending."""
    return sorted({epoch for epoch, _ in plan})


def _alone(obj: Any) -> list[Any]:
    return [obj]


def _no_wait() -> None:
    return None


@dataclass(frozen=True)
class ProcessGroup:
    """The processes that share a precompute pass: ``count`` of them, this one being ``index`` (process 0 writes).

    ``gather(obj)`` returns every process's ``obj`` in process order, on every process; ``barrier()`` waits for all
    of them. The default is a run of one process. :meth:`of` takes them from an ``accelerate.Accelerator``.
    """

    count: int = 1
    index: int = 0
    gather: Callable[[Any], list[Any]] = _alone
    barrier: Callable[[], None] = _no_wait

    @classmethod
    def of(cls, accelerator: Any) -> ProcessGroup:
        """The processes of ``accelerator``'s run (objects are all-gathered with ``accelerate.utils.gather_object``)."""
        from accelerate.utils import gather_object

        return cls(
            accelerator.num_processes,
            accelerator.process_index,
            lambda obj: gather_object([obj]),
            accelerator.wait_for_everyone,
        )


def precompute_reference_logps(
    store: ReferenceLogpStore,
    plan: Sequence[PlannedBatch],
    compute: ComputeReference,
    *,
    processes: ProcessGroup = ProcessGroup(),
    show_progress: bool = True,
) -> int:
    """Fill ``store`` with the values of every planned global micro-batch it lacks; returns how many were computed.

    ``plan`` holds every process's local batch of each global micro-batch (:func:`plan_micro_batches`). Each process
    reads the store as it is on disk and picks the micro-batches of which any process's batch lacks a value, before
    anything is written (a barrier follows): all processes pick the same ones and run the same number of forwards
    (with sharded weights every forward is a collective). Each process computes its own batch of each,
    ``compute(epoch, indices)``, in plan order, so each forward sees the batch that training shows the live
    reference; the values are gathered to process 0, the store's only writer (a flush is not safe against
    concurrent writers), which flushes at each epoch change and at the end (an interrupted pass keeps the epochs it
    finished). A barrier ends the pass, so every process then reads a complete store.
    """
    if len(plan) % processes.count:
        raise ValueError(f"a plan of {len(plan)} local batches does not split over {processes.count} processes")
    groups = [plan[k : k + processes.count] for k in range(0, len(plan), processes.count)]
    todo = [group for group in groups if any(store.missing(epoch, indices) for epoch, indices in group)]
    processes.barrier()  # every process has decided before the writer changes the store
    if todo:
        logger.info("precomputing reference log-likelihoods: %d micro-batches into %s", len(todo), store.folder)
        _compute_into(store, todo, compute, processes, show_progress)
    processes.barrier()
    return len(todo)


def _compute_into(
    store: ReferenceLogpStore,
    todo: Sequence[Sequence[PlannedBatch]],
    compute: ComputeReference,
    processes: ProcessGroup,
    show_progress: bool,
) -> None:
    current: int | None = None
    try:
        for group in tqdm(todo, desc="precomputing reference", disable=not show_progress):
            epoch, indices = group[processes.index]
            chosen, rejected = compute(epoch, list(indices))
            mine = (epoch, list(indices), chosen.detach().float().cpu(), rejected.detach().float().cpu())
            values = processes.gather(mine)
            if processes.index != 0:
                continue
            if current is not None and epoch != current:
                store.flush()
            current = epoch
            for batch_epoch, batch_indices, batch_chosen, batch_rejected in values:
                store.put(batch_epoch, batch_indices, batch_chosen, batch_rejected)
    finally:
        store.flush()  # a no-op on the other processes: they never put


# ------------------------------------------------------------------------------------------ the offloaded copy


class OffloadedReference(torch.nn.Module):
    """A frozen module whose weights live in CPU memory and are streamed to ``execution_device`` submodule by
    submodule during each forward (``accelerate.cpu_offload``).

    Its first parameter is an empty ``anchor`` on the execution device in the weights' dtype: the adapters read
    ``next(model.parameters())`` to place their inputs, and an offloaded module's own parameters sit on ``meta``.
    Attribute reads it does not have (``config``, ...) go to the wrapped module.
    """

    def __init__(self, module: torch.nn.Module, execution_device: torch.device | str, dtype: torch.dtype) -> None:
        from accelerate import cpu_offload

        super().__init__()
        self.anchor = torch.nn.Parameter(torch.empty(0, device=execution_device, dtype=dtype), requires_grad=False)
        self.module = cpu_offload(module, execution_device=torch.device(execution_device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward (weights streamed in by accelerate's hooks)."""
        return self.module(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> OffloadedReference:
        # .to() / .float() / .cuda(): a no-op. The weights stay in the CPU offload map and every forward runs on the
        # execution device, with outputs returned to the input's device, wherever the caller moves "everything".
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def offloaded_frozen_copy(
    module: torch.nn.Module, execution_device: torch.device | str, dtype: torch.dtype = torch.float32
) -> OffloadedReference:
    """A frozen, eval-mode deep copy of ``module`` in ``dtype``, kept on the CPU and run on ``execution_device``.

    Call it while ``module`` is still on the CPU (the copy then never occupies the device); on a CPU-only machine the
    execution device is the CPU and streaming is a no-op, but the forward is the same.
    """
    reference = copy.deepcopy(module).requires_grad_(False).eval()
    move_module(reference, "cpu", dtype)
    return OffloadedReference(reference, execution_device, dtype)
