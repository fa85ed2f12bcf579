"""Which splits a worker holds decoded (`data.resident`), and where the decoded copy comes from.

Streaming (dedn.data.reader) decodes every row group every epoch: on a CPU the model step is
slower than that, on a GPU it is not (docs/scaling.md: a GPU wants ~10 GB/s of decoded features,
the Parquet reader gives ~0.4 GB/s a process). A resident split is decoded once and kept; the
reader gathers each batch by index from it with exactly the batches streaming would give
(`ShardReader(resident=...)`).

The decoded copy holds the whole split, not a rank's share: shares are reshuffled every epoch
(the partition of dedn.data.reader), so over a run every rank reads every row. Under Ray the host
copy is one per node, shared by every worker and every concurrent trial there
(dedn.training.node_cache); `device` copies it once more into each GPU's memory.

Modes: off = stream; host = resident in host memory; device = in the training device's memory
(host memory on a CPU run); auto = device memory on a GPU, host memory otherwise, for each
split while the bytes held stay within `resident_budget_mib` (on a GPU: `resident_device_fraction`
of the device memory free when the phase starts), streaming the rest. Splits are
asked for in order of use (the training split first), so the training split is the one kept
when the budget holds only one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dedn.data.dataset import FeatureDataset
from dedn.data.reader import ResidentSplit, decode_split_arrays
from dedn.errors import ConfigError

__all__ = ["ResidentChoice", "ResidentData", "decode_split", "split_nbytes", "RESIDENT_MODES"]

RESIDENT_MODES = ("auto", "off", "host", "device")
SplitLoader = Callable[[FeatureDataset, str], ResidentSplit]


def split_nbytes(dataset: FeatureDataset, split: str) -> int:
    """Bytes of a split's features decoded in storage dtype (from the manifest; nothing is read)."""
    return dataset.split(split).num_rows * dataset.feature_size * np.dtype(dataset.storage_dtype).itemsize


def decode_split(dataset: FeatureDataset, split: str) -> ResidentSplit:
    """The split decoded in this process (checksums, labels and finiteness checked as in streaming)."""
    return ResidentSplit.from_arrays(split, decode_split_arrays(dataset, split))


@dataclass(frozen=True)
class ResidentChoice:
    """What was decided for one split, for the console and the run's logs."""

    split: str
    where: str  # "stream" | "host" | "device"
    nbytes: int
    reason: str
    shared: bool = False  # the host copy is the node's shared one

    def line(self) -> str:
        mib = self.nbytes / 2**20
        if self.where == "stream":
            return f"{self.split}: streamed from Parquet ({mib:,.0f} MiB decoded; {self.reason})"
        node = ", node-shared copy" if self.shared else ""
        return f"{self.split}: resident in {self.where} memory, {mib:,.0f} MiB ({self.reason}{node})"


class ResidentData:
    """A phase's resident splits: `get(split)` decides once per split and keeps the decoded copy."""

    def __init__(self, dataset: FeatureDataset, mode: str, budget_mib: int, device: str | torch.device,
                 load: SplitLoader | None = None, announce: Callable[[str], None] | None = None,
                 device_fraction: float = 0.0):
        if mode not in RESIDENT_MODES:
            raise ConfigError("data.resident", f"one of {'|'.join(RESIDENT_MODES)}", mode)
        self.dataset, self.mode, self.budget = dataset, mode, int(budget_mib) << 20
        self.device = torch.device(device)
        self.budget_name = f"data.resident_budget_mib={self.budget >> 20}"
        if self.device.type == "cuda" and mode == "auto" and device_fraction > 0:
            # what this GPU has free now (other trials packed on it included), not a fixed figure
            free, _ = torch.cuda.mem_get_info(self.device)
            self.budget = int(free * device_fraction)
            self.budget_name = (f"data.resident_device_fraction={device_fraction:g} of the {free / 2**30:,.1f} GiB "
                                f"free on {self.device}, {self.budget >> 20:,} MiB")
        self.load = load or decode_split
        self.announce = announce
        self.splits: dict[str, ResidentSplit | None] = {}
        self.choices: list[ResidentChoice] = []

    @property
    def held_bytes(self) -> int:
        """Bytes of decoded features this worker holds (host or device; a node-shared copy counted whole)."""
        return sum(s.nbytes for s in self.splits.values() if s is not None)

    def _where(self, nbytes: int) -> tuple[str, str]:
        if self.mode == "off":
            return "stream", "data.resident=off"
        target = "device" if self.device.type != "cpu" and self.mode in ("auto", "device") else "host"
        if self.mode != "auto":
            return target, f"data.resident={self.mode}"
        if self.held_bytes + nbytes > self.budget:
            return "stream", f"{(self.held_bytes + nbytes) / 2**20:,.0f} MiB would exceed {self.budget_name}"
        return target, f"auto, within {self.budget_name}"

    def get(self, split: str) -> ResidentSplit | None:
        """The split's resident copy (decoding or fetching it the first time), or None to stream it."""
        if split in self.splits:
            return self.splits[split]
        nbytes = split_nbytes(self.dataset, split)
        where, reason = self._where(nbytes)
        res = None
        shared = False
        if where != "stream":
            res = self.load(self.dataset, split)
            shared = res.shared
            if where == "device":
                res = res.to(self.device)
        self.splits[split] = res
        choice = ResidentChoice(split, where, nbytes, reason, shared)
        self.choices.append(choice)
        if self.announce is not None:
            self.announce(f"data: {choice.line()}")
        return res
