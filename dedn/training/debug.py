"""Test hooks of the training driver: which samples each rank trained on, a parameter digest, an injected fault.

`DebugHooks` travel in the TorchTrainer's loop config; `_Recorder` is a forward pre-hook on the
training model and a sink of the loop. Off by default; the fault-tolerance tests turn them on.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dedn.atomic import write_text
from dedn.training.report import EpochReport, StateFn

__all__ = ["DebugHooks", "InjectedFault", "feature_digest", "params_digest", "simulated_full_disk"]


class InjectedFault(RuntimeError):
    """Raised on purpose by DebugHooks.fail_* to exercise fault tolerance."""


@dataclass(frozen=True)
class DebugHooks:
    """Test switches, off by default.

    record_dir: each rank writes `rank<r>.json` there: per phase and epoch the digests of the
    feature rows it trained on (see `feature_digest`), and a digest of its final parameters.
    fail_rank / fail_epoch / fail_marker: rank `fail_rank` raises InjectedFault in the middle of
    epoch `fail_epoch` of the select phase (after its first training step) if `fail_marker` does
    not exist yet; it creates the marker first, so the fault happens once per marker.
    fail_kind="disk_full" instead makes the checkpoint write of that epoch fail part-way, as on a
    full disk (rank 0 writes checkpoints: set fail_rank=0).
    """

    record_dir: str = ""
    fail_rank: int = 1
    fail_epoch: int = 0  # 0 = never
    fail_marker: str = ""
    fail_kind: str = "raise"  # "raise": InjectedFault in the forward pass; "disk_full": see simulated_full_disk

    def __post_init__(self) -> None:
        if self.fail_kind not in ("raise", "disk_full"):
            raise ValueError(f"DebugHooks.fail_kind: expected 'raise' or 'disk_full', found {self.fail_kind!r}")


def feature_digest(features: torch.Tensor) -> list[str]:
    """One short hex digest per row of features (B, ...): identifies a sample by its exact feature bytes."""
    rows = features.detach().to("cpu", torch.float32).contiguous().reshape(features.shape[0], -1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in rows]


def params_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name order): equal digests = bitwise-equal models."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


class _Recorder:
    """Forward pre-hook on the training model (digests of the rows seen, the injected fault) and a sink
    (which epoch comes next)."""

    def __init__(self, hooks: DebugHooks, rank: int, phase: str, epoch: int):
        self.hooks, self.rank = hooks, rank
        self.phase, self.epoch, self.steps = phase, epoch, 0
        self.seen: dict[str, dict[str, list[str]]] = {}

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training:
            return
        h = self.hooks
        if (h.fail_kind == "raise" and h.fail_epoch and self.rank == h.fail_rank and self.phase == "select" and self.epoch == h.fail_epoch
                and self.steps >= 1 and h.fail_marker and not os.path.exists(h.fail_marker)):
            Path(h.fail_marker).write_text(f"rank {self.rank} failed at epoch {self.epoch}\n")
            raise InjectedFault(f"injected fault: rank {self.rank}, select epoch {self.epoch}")
        self.steps += 1
        if h.record_dir:
            self.seen.setdefault(self.phase, {}).setdefault(str(self.epoch), []).extend(feature_digest(args[0]))

    def on_epoch(self, report: EpochReport, state: StateFn) -> None:
        # the final phase follows the last selection epoch
        last_select = report.phase == "select" and report.epoch == report.epochs
        self.phase, self.epoch, self.steps = ("final", 1, 0) if last_select else (report.phase, report.epoch + 1, 0)

    def write(self, model: nn.Module) -> None:
        if self.hooks.record_dir:
            write_text(Path(self.hooks.record_dir) / f"rank{self.rank}.json",
                       json.dumps({"rank": self.rank, "seen": self.seen, "params": params_digest(model)}))


@contextmanager
def simulated_full_disk(hooks: DebugHooks, rank: int, phase: str, epoch: int) -> Iterator[None]:
    """Inside the block, files of this process cannot grow past 1 KiB when `hooks` ask for a
    disk_full fault at this rank and select epoch and the marker does not exist yet (it is created
    first). Writes then stop part-way with EFBIG, leaving a truncated file as ENOSPC on a full disk
    would (CPython ignores SIGXFSZ, so the limit gives an OSError, not a signal)."""
    if not (hooks.fail_kind == "disk_full" and hooks.fail_epoch and rank == hooks.fail_rank and phase == "select"
            and epoch == hooks.fail_epoch and hooks.fail_marker and not os.path.exists(hooks.fail_marker)):
        yield
        return
    Path(hooks.fail_marker).write_text(f"rank {rank}: checkpoint write of select epoch {epoch} fails\n")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
