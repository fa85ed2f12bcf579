"""A ShardReader as torch's `IterableDataset`, for a DataLoader with worker processes.

Apart from dedn.data.reader so that the reader imports without torch (its module docstring).
"""
from __future__ import annotations

from typing import Iterator

import torch

from dedn.data.reader import Batch, ShardReader
from dedn.errors import ConfigError

__all__ = ["ShardIterableDataset"]


class ShardIterableDataset(torch.utils.data.IterableDataset):
    """A ShardReader for `DataLoader(ds, batch_size=None, num_workers=num_workers)`.

    Each DataLoader worker reads a disjoint subset of the rank's pieces. `num_workers` must match
    the DataLoader's so that len() is exact (checked when iteration starts).
    """

    def __init__(self, reader: ShardReader, num_workers: int = 0):
        super().__init__()
        self.reader = reader
        self.num_workers = num_workers
        if num_workers > 0:  # worker processes fork from here: hash once, in this process
            reader.verify_checksums()

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)

    def __len__(self) -> int:
        return self.reader.num_batches(max(1, self.num_workers))

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, streams = (0, 1) if info is None else (info.id, info.num_workers)
        if streams != max(1, self.num_workers):
            raise ConfigError("num_workers", f"{self.num_workers} (as given to ShardIterableDataset)",
                              streams, "DataLoader")
        return self.reader.iter_worker(worker, streams)
