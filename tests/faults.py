"""Faults and records for the fault-tolerance tests and tools/soak.py: a training plugin (test side only).

Installed like any training plugin (`dedn.training.callbacks`), with this folder on PYTHONPATH in
the driver and its Ray workers:

    TrainSettings(plugins=faults.plugin(record_dir=..., fail_epoch=2, fail_marker=...))
    DEDN_TRAIN_PLUGINS='{"faults:Faults": {...}}'        # faults.env(...): jobs/train.py, the soak

Options (`Faults`):

* record_dir: each rank writes `rank<r>.json` there: per phase and epoch the digests of the feature
  rows it trained on (`feature_digest`), and the digest of its trained network (`params_digest`).
* fail_rank, fail_epoch, fail_marker, fail_kind: rank `fail_rank` injects a fault in selection
  epoch `fail_epoch` if `fail_marker` does not exist yet; it creates the marker first, so the fault
  happens once per marker. fail_kind "raise": InjectedFault in the forward pass after the epoch's
  first step (Ray restarts the group); "nan": that step's features become NaN (a non-finite loss);
  "disk_full": the epoch's checkpoint write fails part-way, as on a full disk (rank 0 writes
  checkpoints: fail_rank=0); "hold": after the epoch's first step the rank stops and waits up to
  `hold_s` seconds (the test removes its node meanwhile; see test_multinode.py). A worker killed
  from outside is the soak's own (SIGKILL).
* fail_node: a Ray node id: the fault fires on the rank running there instead of on fail_rank.
* Each rank's record also names its Ray node (`node`).
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from dedn.atomic import write_text
from dedn.training.callbacks import PLUGINS_ENV, Callback, WorkerContext
from dedn.training.report import EpochReport, StateFn

__all__ = ["PLUGIN", "FAIL_KINDS", "Faults", "InjectedFault", "feature_digest", "params_digest", "state_digest",
           "plugin", "env"]

PLUGIN = "faults:Faults"
FAIL_KINDS = ("raise", "nan", "disk_full", "hold")
TESTS = Path(__file__).resolve().parent


class InjectedFault(RuntimeError):
    """Raised on purpose (fail_kind "raise") to exercise fault tolerance."""


def feature_digest(features: torch.Tensor) -> list[str]:
    """One short hex digest per row of features (B, ...): identifies a sample by its exact feature bytes."""
    rows = features.detach().to("cpu", torch.float32).contiguous().reshape(features.shape[0], -1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in rows]


def params_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name order): equal digests = bitwise-equal models."""
    return state_digest(model.state_dict())


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """`params_digest` of a state dict (a checkpoint's "model")."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def plugin(**options: Any) -> dict[str, dict[str, Any]]:
    """TrainSettings.plugins for these options."""
    Faults(**options)  # bad options fail here, in the test, not in a worker
    return {PLUGIN: dict(options)}


def env(**options: Any) -> dict[str, str]:
    """The environment of a driver process (jobs/train.py) that injects these faults: DEDN_TRAIN_PLUGINS
    and this folder on PYTHONPATH (for the driver's check and its Ray workers)."""
    path = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {PLUGINS_ENV: json.dumps(plugin(**options)), "PYTHONPATH": path}


@dataclass
class Faults(Callback):
    """The plugin: digests of the rows each rank trained on, its trained network's digest, one injected fault."""

    record_dir: str = ""
    fail_rank: int = 1
    fail_epoch: int = 0  # 0 = never
    fail_marker: str = ""
    fail_kind: str = "raise"
    fail_node: str = ""
    hold_s: float = 120.0

    def __post_init__(self) -> None:
        if self.fail_kind not in FAIL_KINDS:
            raise ValueError(f"Faults.fail_kind: expected one of {FAIL_KINDS}, found {self.fail_kind!r}")
        if self.fail_epoch and not self.fail_marker:
            raise ValueError("Faults: fail_epoch needs fail_marker (the fault happens once per marker)")
        self.rank, self.phase, self.epoch, self.steps, self.node = 0, "select", 1, 0, ""
        self.seen: dict[str, dict[str, list[str]]] = {}

    # ---- the plugin's hooks ------------------------------------------------------------------
    def on_start(self, ctx: WorkerContext) -> None:
        self.rank, self.phase, self.epoch, self.steps = ctx.rank, ctx.phase, ctx.epoch, 0
        ray = sys.modules.get("ray")  # a Ray Train worker's node; a loop run without Ray has none (no Ray started)
        self.node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model.register_forward_pre_hook(self._before_forward)
        return model

    def on_epoch(self, report: EpochReport, state: StateFn) -> None:
        # the final phase follows the last selection epoch
        last_select = report.phase == "select" and report.epoch == report.epochs
        self.phase, self.epoch, self.steps = ("final", 1, 0) if last_select else (report.phase, report.epoch + 1, 0)

    @contextmanager
    def around_checkpoint_write(self, report: EpochReport) -> Iterator[None]:
        """Files of this process cannot grow past 1 KiB inside, for the disk_full fault: writes stop
        part-way with EFBIG, leaving a truncated file as ENOSPC on a full disk would (CPython ignores
        SIGXFSZ, so the limit gives an OSError, not a signal)."""
        if not self._fires("disk_full", report.phase, report.epoch):
            yield
            return
        self._mark(f"rank {self.rank}: checkpoint write of select epoch {report.epoch} fails")
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    def on_end(self, model: nn.Module) -> None:
        if self.record_dir:
            write_text(Path(self.record_dir) / f"rank{self.rank}.json",
                       json.dumps({"rank": self.rank, "node": self.node, "seen": self.seen,
                                   "params": params_digest(model)}))

    # ---- the faults ----------------------------------------------------------------------------
    def _fires(self, kind: str, phase: str, epoch: int) -> bool:
        here = self.node == self.fail_node if self.fail_node else self.rank == self.fail_rank
        return (self.fail_kind == kind and bool(self.fail_epoch) and here and phase == "select"
                and epoch == self.fail_epoch and not os.path.exists(self.fail_marker))

    def _mark(self, what: str) -> None:
        Path(self.fail_marker).write_text(what + "\n")

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not module.training:
            return None
        out = None
        if self.steps >= 1 and self._fires("raise", self.phase, self.epoch):
            self._mark(f"rank {self.rank} failed at epoch {self.epoch}")
            raise InjectedFault(f"injected fault: rank {self.rank}, select epoch {self.epoch}")
        if self.steps >= 1 and self._fires("nan", self.phase, self.epoch):
            self._mark(f"rank {self.rank}: NaN features at epoch {self.epoch}, step {self.steps + 1}")
            out = (torch.full_like(args[0], float("nan")), *args[1:])
        if self.steps >= 1 and self._fires("hold", self.phase, self.epoch):
            self._mark(f"rank {self.rank} holds at epoch {self.epoch} on node {self.node}")
            time.sleep(self.hold_s)  # its node goes away meanwhile, this process with it
        self.steps += 1
        if self.record_dir:
            self.seen.setdefault(self.phase, {}).setdefault(str(self.epoch), []).extend(feature_digest(args[0]))
        return out
