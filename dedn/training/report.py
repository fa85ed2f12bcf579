"""What one epoch reports (`EpochReport`) and where it goes (`Sink`s: console, MLflow, Ray Train).

The training loop (`dedn.training.loop`) builds one `EpochReport` per epoch and hands it, with
a function that returns the checkpoint state, to each sink in order. `EpochReport.metrics()` is
the only place metric names are made: MLflow, Ray Train, Tune and the console all read it (MLflow
under grouped keys, `dedn.tracking.metric_key`: `val_H` is `val/H` there).
Names: the family's loss parts, images_per_s, epoch_time_s, data_wait_frac, worker_peak_rss_mib
(training keys carry the prefix `final_` in the final phase); val_T/U/S/H, the family's weight
names (their fitted or configured values), best_val_H (selection); test_T/U/S/H (final, once).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

__all__ = ["Best", "EpochReport", "Sink", "ConsoleSink", "SCORE_ATTRIBUTE", "emit", "say"]

SCORE_ATTRIBUTE = "val_H"  # what checkpoints are ranked by


@dataclass
class Best:
    """The best epoch so far: selection picks it on validation H; the final phase's is its last epoch."""

    epoch: int = 0
    H: float = -1.0
    metrics: dict[str, float] | None = None
    weights: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "H": self.H, "metrics": self.metrics, "weights": dict(self.weights)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Best":
        return cls(int(d["epoch"]), float(d["H"]), d.get("metrics"), dict(d.get("weights", {})))


@dataclass
class EpochReport:
    """One epoch of one phase, group-wide (every rank holds the same values)."""

    phase: str  # "select" | "final"
    epoch: int
    epochs: int
    losses: dict[str, float]  # mean of each loss part over the epoch's steps ("loss" = the total)
    steps: int
    images: int  # trained on by the whole group
    seconds: float  # the slowest rank's training time
    data_wait_frac: float  # the worst rank's share of that time spent waiting for batches
    peak_rss_mib: float  # the worst rank's peak resident memory
    best: Best
    val: dict[str, float] | None = None  # validation at the configured weights
    val_fitted: dict[str, float] | None = None  # validation at the best grid weights (when fitted)
    weights: dict[str, float] = field(default_factory=dict)  # the weights `val_*` metrics are at
    eval_seconds: float = 0.0
    test: dict[str, float] | None = None  # final phase, last epoch only
    test_per_class: list[tuple] | None = None  # dedn.metrics.ClassAccuracy rows of that test
    epoch_time_s: float = 0.0  # wall time of the whole epoch, evaluation included
    resident_mib: float = 0.0  # decoded features rank 0 holds (data.resident; a node-shared copy counted whole)
    gpu_peak_mib: float = 0.0  # the worst rank's peak GPU memory (torch's allocator), 0 on CPU

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        pre = "" if self.phase == "select" else "final_"
        out = {f"{pre}{k}": float(v) for k, v in self.losses.items()}
        out[f"{pre}images_per_s"] = self.images_per_s
        out[f"{pre}epoch_time_s"] = float(self.epoch_time_s)
        out[f"{pre}data_wait_frac"] = float(self.data_wait_frac)
        out["worker_peak_rss_mib"] = float(self.peak_rss_mib)
        out["data_resident_mib"] = float(self.resident_mib)
        if self.gpu_peak_mib:
            out["worker_peak_gpu_mib"] = float(self.gpu_peak_mib)
        if self.phase == "select":
            val = self.val_fitted or self.val or {}
            out.update({f"val_{k}": float(v) for k, v in val.items()})
            out.update({k: float(v) for k, v in self.weights.items()})
            out["best_val_H"] = float(self.best.H)
            out["epoch"] = float(self.epoch)
        if self.test:
            out.update({f"test_{k}": float(v) for k, v in self.test.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (the history stored in checkpoints)."""
        d = dict(self.__dict__)
        d["best"] = self.best.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EpochReport":
        return cls(**{**d, "best": Best.from_dict(d["best"])})


StateFn = Callable[[], dict[str, Any]]


class Sink(Protocol):
    """Receives every epoch report (on every rank: a sink that writes checks the rank itself)."""

    def on_epoch(self, report: EpochReport, state: StateFn) -> None: ...


def emit(sinks: Sequence[Sink], report: EpochReport, state: StateFn) -> None:
    for s in sinks:
        s.on_epoch(report, state)


def say(line: str) -> None:
    """One console line. Not print(): Ray Train V2 patches print in workers to log AND echo it
    (each line would show twice); a direct write to stdout is forwarded to the driver once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ConsoleSink:
    """Rank 0's progress line: phase, epoch, loss parts, speed, memory, validation or test T/U/S/H."""

    def __init__(self, world_size: int = 1, rank: int = 0):
        self.world_size, self.rank = world_size, rank

    def on_epoch(self, report: EpochReport, state: StateFn) -> None:
        if self.rank == 0:
            say(progress_line(report, self.world_size))


def progress_line(r: EpochReport, world_size: int) -> str:
    parts = " ".join(f"{k} {v:.4g}" for k, v in r.losses.items() if k != "loss")
    s = (f"[{r.phase:6s}] epoch {r.epoch:3d}/{r.epochs:<3d} loss {r.losses.get('loss', float('nan')):.4g} ({parts})"
         f"  {r.images_per_s:.0f} img/s on {world_size} worker(s)  {r.epoch_time_s:.1f} s"
         f"  data wait {100 * r.data_wait_frac:.1f}%  peak RSS {r.peak_rss_mib / 1024:.2f} GB/worker")
    val = r.val_fitted or r.val
    if val:
        w = ", ".join(f"{k} {v:.2f}" for k, v in r.weights.items())
        s += f"  val T {100 * val['T']:.1f} U {100 * val['U']:.1f} S {100 * val['S']:.1f} H {100 * val['H']:.1f} ({w})"
    if r.test:
        t = r.test
        s += f"  TEST T {100 * t['T']:.1f} U {100 * t['U']:.1f} S {100 * t['S']:.1f} H {100 * t['H']:.1f}"
    return s
