"""Deterministic, process-count-independent batches of dataset indices.

The global micro-batch ``k`` of epoch ``e`` is a fixed slice of a permutation seeded by (seed, e); process ``p`` of
``N`` takes the ``p``-th contiguous part of it. One process with batch ``N·b`` therefore sees exactly the samples that
``N`` processes with batch ``b`` see together, and a resumed run can jump straight to any micro-batch.
"""

from __future__ import annotations

import torch

from diffalign.utils.randomness import sample_key

SHUFFLE_STREAM = 17


class EpochBatches:
    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        global_batch = batch_size * num_processes
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global micro-batch of {global_batch} "
                f"(train_batch_size {batch_size} x {num_processes} processes): lower train.train_batch_size or add data"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = num_samples // global_batch
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(sample_key(self.seed, epoch, 0, SHUFFLE_STREAM))
                self._order = torch.randperm(self.num_samples, generator=gen).tolist()
            else:
                self._order = list(range(self.num_samples))
            self._order_epoch = epoch
        return self._order

    def local_indices(self, micro_batch: int) -> tuple[int, list[int]]:
        """Return (epoch, this process's dataset indices) for the run's ``micro_batch``-th global micro-batch."""
        epoch, k = divmod(micro_batch, self.batches_per_epoch)
        start = k * self.batch_size * self.num_processes + self.process_index * self.batch_size
        return epoch, self.order(epoch)[start : start + self.batch_size]
