"""Micro-batches through a real ``torch.utils.data.DataLoader``: decoding and collation in worker processes, batches
in the deterministic order of :class:`~diffalign.trainers.batching.EpochBatches`.

The batch sampler yields, from the run's micro-batch ``start`` on and forever, this process's indices of each global
micro-batch as ``(epoch, index)`` pairs; :class:`EpochIndexed` sets the epoch on its copy of the dataset before
reading a sample. Every per-sample random draw (flips, crops, prompt dropout, noise, timesteps) is addressed by
(seed, epoch, index), so a batch is the same whichever process — main or worker — builds it: results do not depend
on ``data.num_workers``, and a resumed run starts its loader at the micro-batch after the checkpoint.

A dataset whose ``reads_in_place`` attribute is true (the latent cache: a sample is a slice of a memory-mapped
file, ~0.3 ms a pair) is read in the training process whatever ``data.num_workers`` says: a worker would only add
the hand-over of its tensors through shared memory (measured with scripts/bench_offline.py: the cached step went
from 1.06x to 1.10-1.17x the bare training loop's with one worker).

A sample that fails in a worker (a row that does not decode) comes back as a :class:`SampleFailure` instead of
DataLoader's wrapped worker traceback; :class:`MicroBatchStream` re-raises the original exception in the training
process, so the user reads the same ``FILE: row N: reason`` message with any number of workers.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffalign.trainers.batching import EpochBatches

#: one sample's address: (epoch, dataset index)
SampleKey = tuple[int, int]


@dataclass
class LoaderSettings:
    """DataLoader options of ``data.*``; ``pin_memory`` only takes effect when batches go to a CUDA device."""

    num_workers: int = 0
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int | None = 2


class EpochBatchSampler(Sampler[list[SampleKey]]):
    """This process's ``(epoch, index)`` lists of global micro-batches ``start, start + 1, ...`` (endless)."""

    def __init__(self, batches: EpochBatches, start: int = 0) -> None:
        self.batches = batches
        self.start = start

    def __iter__(self) -> Iterator[list[SampleKey]]:
        k = self.start
        while True:
            epoch, indices = self.batches.local_indices(k)
            yield [(epoch, i) for i in indices]
            k += 1


class SampleFailure:
    """What a worker returns instead of raising: the exception (if it pickles) and the worker's traceback text."""

    def __init__(self, error: BaseException) -> None:
        self.traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        try:
            pickle.dumps(error)
            self.error: BaseException = error
        except Exception:
            self.error = RuntimeError(f"{type(error).__name__}: {error}")

    def __getstate__(self) -> dict[str, Any]:
        return {"error": self.error.with_traceback(None), "traceback": self.traceback}

    def raise_error(self) -> None:
        raise self.error from WorkerTraceback(self.traceback)


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a DataLoader worker (shown as the cause of the re-raised error)."""

    def __str__(self) -> str:
        return "in a DataLoader worker:\n" + str(self.args[0])


class EpochIndexed(Dataset):
    """``dataset[(epoch, i)]``: sets the epoch on this process's copy of ``dataset`` (``set_epoch``), then reads
    sample ``i``; returns ``(epoch, sample)``, or ``(epoch, SampleFailure)`` if reading raised."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[int, Any]:
        epoch, index = key
        try:
            self.dataset.set_epoch(epoch)
            return epoch, self.dataset[index]
        except Exception as err:
            return epoch, SampleFailure(err)


class EpochCollate:
    """Collate ``(epoch, sample)`` items of one micro-batch into ``(epoch, batch)`` with the trainer's collate."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[tuple[int, Any]]) -> tuple[int, Any]:
        epoch = items[0][0]
        samples = [sample for _, sample in items]
        for sample in samples:
            if isinstance(sample, SampleFailure):
                return epoch, sample
        try:
            return epoch, self.collate(samples)
        except Exception as err:
            return epoch, SampleFailure(err)


class MicroBatchStream:
    """Iterator of ``(epoch, local batch)`` over a DataLoader; :meth:`close` stops its workers."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self._iterator: Iterator[tuple[int, Any]] | None = iter(loader)

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._iterator is None:
            raise StopIteration
        epoch, batch = next(self._iterator)
        if isinstance(batch, SampleFailure):
            self.close()
            batch.raise_error()
        return epoch, batch

    def close(self) -> None:
        """Shut the worker processes down now rather than at garbage collection."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def effective_workers(dataset: Any, requested: int) -> int:
    """The DataLoader workers ``dataset`` is read with: ``requested``, or 0 for a dataset that reads in place."""
    return 0 if getattr(dataset, "reads_in_place", False) else requested


def micro_batch_loader(
    dataset: Any,
    collate: Callable[[list[Any]], Any],
    batches: EpochBatches,
    start: int,
    settings: LoaderSettings,
    device: torch.device,
) -> MicroBatchStream:
    """A :class:`MicroBatchStream` of ``dataset``'s micro-batches ``start, start + 1, ...`` in ``batches``' order."""
    workers = effective_workers(dataset, settings.num_workers)
    loader = DataLoader(
        EpochIndexed(dataset),
        batch_sampler=EpochBatchSampler(batches, start),
        collate_fn=EpochCollate(collate),
        num_workers=workers,
        pin_memory=settings.pin_memory and device.type == "cuda",
        persistent_workers=settings.persistent_workers and workers > 0,
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
    )
    return MicroBatchStream(loader)
