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

A sample that fails in a worker comes back as a :class:`SampleFailure` instead of DataLoader's wrapped worker
traceback; :class:`MicroBatchStream` re-raises the original exception in the training process, so the user reads
the same ``FILE: row N: reason`` message with any number of workers.

A row that does not decode (:class:`~diffalign.data.pickapic.BadRowError`) under the dataset's
``on_bad_row == "skip"`` is replaced, wherever it is drawn, by the next pair that reads (index + 1, + 2, ...,
wrapping), whole: that pair's sample of the same epoch, its index, draws and reference values included
(:func:`read_sample`). The stand-in depends on the data only, not on which process reads it, so results stay
independent of ``data.num_workers``, and the batch keeps its size. Each skipped row is logged once by the training
process, and the count is logged when the stream closes (``MicroBatchStream.skipped``).
"""

from __future__ import annotations

import logging
import pickle
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffalign.data.pickapic import BadRowError, PreferenceDataError
from diffalign.trainers.batching import EpochBatches

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class SkippedRow:
    """A pair that did not read under ``on_bad_row == "skip"``: its index, the pair read instead, and why."""

    index: int
    replacement: int
    reason: str


def read_sample(dataset: Any, index: int, skip_bad_rows: bool) -> tuple[Any, list[SkippedRow]]:
    """``dataset[index]`` and no skipped row; with ``skip_bad_rows``, if ``index`` raises :class:`BadRowError`, the
    sample of the next index (wrapping) that reads, and ``index`` as skipped with that stand-in.

    Raises:
        BadRowError: ``index`` does not read and ``skip_bad_rows`` is false.
        PreferenceDataError: no pair of ``dataset`` reads.
    """
    try:
        return dataset[index], []
    except BadRowError as err:
        if not skip_bad_rows:
            raise
        reason = str(err)
    size = len(dataset)
    for step in range(1, size):
        candidate = (index + step) % size
        try:
            return dataset[candidate], [SkippedRow(index, candidate, reason)]
        except BadRowError:
            continue  # also bad: counted when it is drawn itself
    raise PreferenceDataError(
        f"none of the {size} pairs reads (data.on_bad_row=skip), e.g. {reason}; check the data source"
    )


class EpochIndexed(Dataset):
    """``dataset[(epoch, i)]``: sets the epoch on this process's copy of ``dataset`` (``set_epoch``), then reads
    sample ``i`` (:func:`read_sample`, skipping rows that do not decode if ``dataset.on_bad_row == "skip"``);
    returns ``(epoch, sample, skipped rows)``, or ``(epoch, SampleFailure, [])`` if reading raised."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.skip_bad_rows = getattr(dataset, "on_bad_row", "error") == "skip"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[int, Any, list[SkippedRow]]:
        epoch, index = key
        try:
            self.dataset.set_epoch(epoch)
            return (epoch, *read_sample(self.dataset, index, self.skip_bad_rows))
        except Exception as err:
            return epoch, SampleFailure(err), []


class EpochCollate:
    """Collate ``(epoch, sample, skipped)`` items of one micro-batch into ``(epoch, batch, skipped)`` with the
    trainer's collate."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[tuple[int, Any, list[SkippedRow]]]) -> tuple[int, Any, list[SkippedRow]]:
        epoch = items[0][0]
        samples = [sample for _, sample, _ in items]
        skipped = [row for _, _, rows in items for row in rows]
        for sample in samples:
            if isinstance(sample, SampleFailure):
                return epoch, sample, skipped
        try:
            return epoch, self.collate(samples), skipped
        except Exception as err:
            return epoch, SampleFailure(err), skipped


class MicroBatchStream:
    """Iterator of ``(epoch, local batch)`` over a DataLoader; :meth:`close` stops its workers.

    ``skipped`` counts, per skipped row index, the samples that read a stand-in for it (``on_bad_row == "skip"``);
    a row is logged the first time it is skipped, the totals when the stream closes.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self._iterator: Iterator[tuple[int, Any, list[SkippedRow]]] | None = iter(loader)
        self.skipped: Counter[int] = Counter()

    def __iter__(self) -> MicroBatchStream:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._iterator is None:
            raise StopIteration
        epoch, batch, skipped = next(self._iterator)
        self._count(skipped)
        if isinstance(batch, SampleFailure):
            self.close()
            batch.raise_error()
        return epoch, batch

    def _count(self, skipped: Sequence[SkippedRow]) -> None:
        for row in skipped:
            if row.index not in self.skipped:
                logger.warning(
                    "skip: pair %d is read in place of this row (data.on_bad_row=skip): %s", row.replacement, row.reason
                )
            self.skipped[row.index] += 1

    def close(self) -> None:
        """Shut the worker processes down now rather than at garbage collection; log what was skipped."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if iterator is not None and self.skipped:
            logger.warning(
                "skip: %d samples read the next pair instead of a row that does not decode (%d such rows; "
                "data.on_bad_row=skip)",
                sum(self.skipped.values()),
                len(self.skipped),
            )


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
