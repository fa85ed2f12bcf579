"""Evaluation: GZSL counts of a model on a seen-side and an unseen-side split, at the configured
inference weights and (on validation) at every point of the family's weight grid, summed over
ranks by a `Collective` so every rank returns the same figures (docs/method.md#gzsl-metrics,
docs/method.md#post-hoc-lambda-fit)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch
from torch import Tensor, nn

from dedn.accel import autocast
from dedn.config import RunConfig
from dedn.data.reader import Batch
from dedn.families import ModelFamily, family_of
from dedn.metrics import ClassAccuracy, GZSLCounts, WeightSearch
from dedn.protocol import ClassProtocol

__all__ = ["Collective", "EvalResult", "weight_search", "evaluate"]


class Collective(Protocol):
    """In-place reductions over the ranks of a group (torch.distributed on a worker group)."""

    def sum_(self, t: Tensor) -> None: ...

    def max_(self, t: Tensor) -> None: ...

    def broadcast_(self, t: Tensor) -> None: ...  # rank 0's values to every rank


@dataclass
class EvalResult:
    """metrics {'T','U','S','H'} at the configured weights; the grid's best when searched; per-class rows."""

    metrics: dict[str, float]
    best_weights: dict[str, float] | None
    best_metrics: dict[str, float] | None
    per_class: list[ClassAccuracy]
    weights: dict[str, float]  # the configured weights of `metrics`
    seconds: float = 0.0
    search: WeightSearch | None = None  # counts at every grid point, when fitted (Figure 3)


def weight_search(cfg: RunConfig, num_classes: int, family: ModelFamily | None = None) -> WeightSearch:
    """An empty search over the family's post-hoc weight grid for a run config."""
    family = family or family_of(cfg)
    return WeightSearch(num_classes, family.weight_grid(cfg), lambda w, names: family.coefficients(cfg, w, names),
                        calibration=cfg.eval.calibration, prefer=family.configured_weights(cfg))


@torch.no_grad()
def evaluate(model: nn.Module, seen_batches: Iterable[Batch], unseen_batches: Iterable[Batch], protocol: ClassProtocol,
             cfg: RunConfig, *, device: str | torch.device = "cpu", collective: Collective | None = None,
             autocast_dtype: torch.dtype | None = None, fit_weights: bool | None = None) -> EvalResult:
    """GZSL metrics of the model on a seen-side and an unseen-side split.

    Counts at cfg.eval's weights and calibration, and at every grid point when `fit_weights`
    (default cfg.eval.fit_weights); `collective` sums each count tensor over ranks (every rank
    then returns the same result). Never fit weights on test splits.
    """
    device = torch.device(device)
    family = family_of(cfg)
    ev = cfg.eval
    fit = ev.fit_weights if fit_weights is None else fit_weights
    weights = family.configured_weights(cfg)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    counts = GZSLCounts(protocol.num_classes)
    search = weight_search(cfg, protocol.num_classes, family) if fit else None
    try:
        for side, batches in (("seen", seen_batches), ("unseen", unseen_batches)):
            for batch in batches:
                x = batch.features.to(device, torch.float32, non_blocking=True)  # (B, C, H, W), float32 on the device
                y = batch.labels.to(device, non_blocking=True)
                with autocast(device, autocast_dtype):
                    out = model(x)
                parts = family.score_parts(out)  # {name: (B, K)} in float32
                counts.update(family.combine(cfg, parts, weights), y, protocol, side=side,  # type: ignore[arg-type]
                              calibration=ev.calibration)
                if search is not None:
                    search.update(parts, y, protocol, side=side)  # type: ignore[arg-type]
    finally:
        model.train(was_training)
    if collective is not None:
        t = counts.tensor().to(device)
        collective.sum_(t)
        counts = GZSLCounts.from_tensor(t.cpu())
        if search is not None:
            s = search.tensor().to(device)
            collective.sum_(s)
            search.load_tensor(s.cpu())
    best_w = best_m = None
    if search is not None:
        best_w, best_m = search.best(protocol)
    return EvalResult(metrics=counts.compute(protocol), best_weights=best_w, best_metrics=best_m,
                      per_class=counts.per_class_accuracy(protocol), weights=weights,
                      seconds=time.perf_counter() - t0, search=search)
