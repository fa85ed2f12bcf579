"""Generalized zero-shot metrics: per-class mean top-1 T, U, S and H, and the post-hoc weight search.

* S: samples of the seen-side split, argmax over the phase's active classes (seen + unseen);
* U: samples of the unseen-side split, argmax over the active classes;
* T: samples of the unseen-side split, argmax over the unseen classes only;
* H = 2 S U / (S + U).

Each figure is the mean over the classes (of that side, with at least one sample) of the
fraction of that class's samples predicted correctly. Calibrated stacking subtracts a constant
from the seen-class scores before the GZSL argmax (not for T, where only unseen classes compete):
`gzsl_decision`, the one decision rule, which `dedn.inference.Predictor` applies too.

Everything is accumulated as integer per-class counts held in ONE int64 tensor, so that a
distributed evaluation does a single `all_reduce(SUM)` and every rank then computes the same
figures. `WeightSearch` keeps those counts for every point of a model family's grid of inference
weights (DEDN: lambda_rc, lambda_e), from the cached score parts the family's inference score is
linear in, so any weight is scored without running the network again
(docs/method.md#post-hoc-lambda-fit).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from dedn.errors import ConfigError, DatasetError
from dedn.protocol import ClassProtocol

METRICS = ("T", "U", "S", "H")  # the order every table and log uses


def format_pct(v: float | None) -> str:
    """A metric fraction as a table cell: percent with one decimal, "-" when missing or not finite."""
    return "-" if v is None or not math.isfinite(v) else f"{100.0 * v:.1f}"

Side = Literal["seen", "unseen"]

# Rows of a GZSLCounts block: hits and totals per class.
_S_HIT, _U_HIT, _T_HIT, _S_N, _U_N = range(5)


class ClassAccuracy(NamedTuple):
    """One row of `per_class_accuracy`: T accuracy only for unseen classes."""

    class_id: int
    side: Side
    t_acc: float | None
    gzsl_acc: float
    n: int


class _Columns(NamedTuple):
    """Column bookkeeping of a protocol: argmaxes run over the active columns only."""

    active: Tensor  # (A,) int64 active class ids, ascending
    seen_in_active: Tensor  # (A,) bool
    unseen_pos: Tensor  # (U,) int64 positions of the unseen classes within `active`


@lru_cache(maxsize=32)  # per (protocol, device): evaluation asks for the same columns every batch
def _columns(protocol: ClassProtocol, device: torch.device | str) -> _Columns:
    active = torch.nonzero(protocol.active_mask(device)).reshape(-1)
    return _Columns(active, protocol.seen_mask(device)[active], torch.nonzero(protocol.unseen_mask(device)[active]).reshape(-1))


def calibrated(scores: Tensor, seen: Tensor, calibration: float) -> Tensor:
    """Calibrated stacking: `calibration` subtracted from the scores (..., C) of the seen classes (`seen` (C,) bool)."""
    return scores - calibration * seen.to(scores.dtype) if calibration != 0.0 else scores


def gzsl_decision(scores: Tensor, classes: Tensor, seen: Tensor, calibration: float = 0.0) -> tuple[Tensor, Tensor]:
    """The GZSL decision, the one rule of evaluation and prediction: calibrated stacking, then the argmax.

    scores (..., C): the scores of `classes` (C,) int64, ascending; seen (C,) bool marks the seen ones.
    -> (the winning class ids (...,) int64, their calibrated scores (...,)). Ascending columns keep
    torch.argmax's first-maximum rule: ties go to the smallest class id.
    """
    z = calibrated(scores, seen, calibration)
    i = z.argmax(-1)
    return classes[i], z.gather(-1, i.unsqueeze(-1)).squeeze(-1)


def _predict(z: Tensor, cols: _Columns, calibration: float, with_t: bool) -> tuple[Tensor, Tensor | None]:
    """z (..., A) scores of the active classes -> (GZSL class ids (...,), T class ids (...,) | None)."""
    pred, _ = gzsl_decision(z, cols.active, cols.seen_in_active, calibration)
    pred_t = cols.active[cols.unseen_pos][z[..., cols.unseen_pos].argmax(-1)] if with_t else None
    return pred, pred_t


def gzsl_predictions(scores: Tensor, protocol: ClassProtocol, calibration: float = 0.0) -> tuple[Tensor, Tensor]:
    """Argmax class ids for GZSL (active classes, seen ones calibrated) and for T (unseen classes only).

    scores (..., K) -> (pred_gzsl (...,), pred_t (...,)) int64; ties go to the smallest class id.
    """
    if scores.shape[-1] != protocol.num_classes:
        raise ConfigError("scores", f"(..., {protocol.num_classes}) class scores", tuple(scores.shape), "dedn.metrics")
    cols = _columns(protocol, scores.device)
    pred, pred_t = _predict(scores[..., cols.active], cols, calibration, with_t=True)
    assert pred_t is not None
    return pred, pred_t


def _check_labels(labels: Tensor, protocol: ClassProtocol, side: Side, n: int) -> Tensor:
    """Labels as (n,) int64 after the checks that need no device value; `_invalid` holds the rest."""
    if side not in ("seen", "unseen"):
        raise ConfigError("side", "one of seen|unseen", side, "dedn.metrics")
    labels = labels.reshape(-1).long()
    if labels.numel() != n:
        raise DatasetError("evaluation batch", "labels", f"{n} labels (one per score row)", labels.numel())
    return labels


def _invalid(labels: Tensor, protocol: ClassProtocol, side: Side) -> Tensor:
    """(K + 2,) int64 counts of the labels not of `side`'s classes, on the labels' device and without waiting
    for it: bin 0 counts ids < 0, bin K + 1 ids >= K, bin 1 + k class k. Checked once, when counts are read."""
    k = protocol.num_classes
    allowed = protocol.seen_mask(labels.device) if side == "seen" else protocol.unseen_mask(labels.device)
    clamped = labels.clamp(-1, k)
    inside = (clamped >= 0) & (clamped < k)
    bad = ~inside | ~allowed[clamped.clamp(0, k - 1)]
    return torch.zeros(k + 2, dtype=torch.int64, device=labels.device).index_add_(0, clamped + 1, bad.to(torch.int64))


def _raise_invalid(bad: dict[str, Tensor], protocol: ClassProtocol) -> None:
    """The deferred label check: one DatasetError naming the side and the offending class ids, if any."""
    for side, invalid in bad.items():
        counts = invalid.cpu()
        if int(counts.sum()):
            # -1 stands for any id < 0, K (protocol.num_classes) for any id >= K
            ids = [b - 1 for b in torch.nonzero(counts).reshape(-1).tolist()]
            raise DatasetError("evaluation batch", "labels", f"{side} classes of the protocol",
                               f"{int(counts.sum())} labels of other classes, class ids {ids[:10]}")


def _class_mean(hits: Tensor, n: Tensor, classes: Sequence[int]) -> Tensor:
    """Mean over `classes` with n > 0 of hits / n. hits, n (..., K) -> (...,) float64 (0 if no class has samples)."""
    sel = torch.zeros(hits.shape[-1], dtype=torch.bool)
    sel[list(classes)] = True
    has = (n > 0) & sel  # (..., K)
    acc = torch.where(has, hits.double() / n.double().clamp_min(1), torch.zeros((), dtype=torch.float64))
    count = has.sum(-1)
    return torch.where(count > 0, acc.sum(-1) / count.clamp_min(1), torch.zeros((), dtype=torch.float64))


def _metrics(block: Tensor, protocol: ClassProtocol) -> dict[str, Tensor]:
    """block (..., 5, K) int64 counts -> {'T', 'U', 'S', 'H'} (...,) float64."""
    s = _class_mean(block[..., _S_HIT, :], block[..., _S_N, :], protocol.seen)
    u = _class_mean(block[..., _U_HIT, :], block[..., _U_N, :], protocol.unseen)
    t = _class_mean(block[..., _T_HIT, :], block[..., _U_N, :], protocol.unseen)
    h = torch.where(s + u > 0, 2 * s * u / (s + u).clamp_min(1e-300), torch.zeros_like(s))
    return {"T": t, "U": u, "S": s, "H": h}


def _bincount(labels: Tensor, hits: Tensor, k: int) -> Tensor:
    """Per-class sums of `hits` (..., B) bool over samples of class labels (B,) -> (..., K) int64."""
    out = torch.zeros(*hits.shape[:-1], k, dtype=torch.int64, device=hits.device)
    return out.index_add_(-1, labels, hits.to(torch.int64))


class GZSLCounts:
    """Integer per-class hits and totals for S, U and T at one score combination.

    Counts live in `counts` (5, K) int64: hits S, hits U, hits T, samples of the seen side,
    samples of the unseen side.
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self._counts = torch.zeros(5, self.num_classes, dtype=torch.int64)
        self._bad: dict[str, Tensor] = {}  # per side, labels of other classes, counted on the device (`_invalid`)
        self._protocol: ClassProtocol | None = None

    @property
    def counts(self) -> Tensor:
        """(5, K) int64 on the host; the first read after updates checks their labels (one wait, not one a batch)."""
        if self._protocol is not None:
            bad, self._bad, protocol, self._protocol = self._bad, {}, self._protocol, None
            _raise_invalid(bad, protocol)
        if self._counts.device.type != "cpu":
            self._counts = self._counts.cpu()
        return self._counts

    @counts.setter
    def counts(self, value: Tensor) -> None:
        self._counts = value

    @torch.no_grad()
    def update(self, scores: Tensor, labels: Tensor, protocol: ClassProtocol, *, side: Side, calibration: float = 0.0) -> None:
        """Add a batch: scores (B, K), labels (B,) of classes of `side` ("seen" or "unseen").

        Nothing here waits for a GPU: the counts stay on the scores' device, and the labels' side is
        checked when the counts are read."""
        scores = scores.detach()
        labels = _check_labels(labels.to(scores.device), protocol, side, scores.shape[0])
        bad = _invalid(labels, protocol, side)
        self._bad[side] = self._bad[side].to(bad.device) + bad if side in self._bad else bad
        self._protocol = protocol
        safe = labels.clamp(0, self.num_classes - 1)  # a wrong label fails at the read, not as an index error
        pred, pred_t = gzsl_predictions(scores, protocol, calibration)  # (B,), (B,)
        k = self.num_classes
        block = torch.zeros(5, k, dtype=torch.int64, device=scores.device)
        if side == "seen":
            block[_S_HIT] = _bincount(safe, pred == labels, k)
            block[_S_N] = torch.bincount(safe, minlength=k)
        else:
            block[_U_HIT] = _bincount(safe, pred == labels, k)
            block[_T_HIT] = _bincount(safe, pred_t == labels, k)
            block[_U_N] = torch.bincount(safe, minlength=k)
        self._counts = self._counts.to(block.device) + block

    def tensor(self) -> Tensor:
        """All counts as one flat int64 tensor (5 K,), for one all_reduce(SUM)."""
        return self.counts.reshape(-1).clone()

    @classmethod
    def from_tensor(cls, t: Tensor) -> "GZSLCounts":
        t = torch.as_tensor(t).reshape(-1)
        if t.numel() % 5 or t.dtype != torch.int64:
            raise ConfigError("counts", "an int64 tensor of 5 K counts (GZSLCounts.tensor())", f"{t.dtype} of {t.numel()}", "GZSLCounts")
        out = cls(t.numel() // 5)
        out.counts = t.cpu().reshape(5, -1).clone()
        return out

    def compute(self, protocol: ClassProtocol) -> dict[str, float]:
        """{'T', 'U', 'S', 'H'} as fractions in [0, 1]; a side without samples scores 0."""
        return {k: float(v) for k, v in _metrics(self.counts, protocol).items()}

    def per_class_accuracy(self, protocol: ClassProtocol) -> list[ClassAccuracy]:
        """One row per class with samples: seen classes first, then unseen, ids ascending."""
        c = self.counts
        rows: list[ClassAccuracy] = []
        for k in sorted(protocol.seen):
            n = int(c[_S_N, k])
            if n:
                rows.append(ClassAccuracy(k, "seen", None, int(c[_S_HIT, k]) / n, n))
        for k in sorted(protocol.unseen):
            n = int(c[_U_N, k])
            if n:
                rows.append(ClassAccuracy(k, "unseen", int(c[_T_HIT, k]) / n, int(c[_U_HIT, k]) / n, n))
        return rows


class WeightSearch:
    """GZSL counts at every point of a family's post-hoc weight grid, from cached score parts.

    weights: `dedn.families.PostHocWeights` (names, the values of each); coefficients(point,
    part names) -> the factor of each part in the inference score at that point (the family's
    `coefficients`). `prefer` = the configured weights: among grid points with equal H, the
    closest one wins. Counts live in `hits` (3, *shape, K) (S, U, T) and `totals` (2, K).
    """

    def __init__(self, num_classes: int, weights: Any, coefficients: Callable[[Mapping[str, float], Sequence[str]], Sequence[float]],
                 *, calibration: float = 0.0, prefer: Mapping[str, float] | None = None, max_elements: int = 1 << 24):
        self.num_classes = int(num_classes)
        self.weights, self.coefficients, self.calibration = weights, coefficients, float(calibration)
        self.names: tuple[str, ...] = tuple(weights.names)
        self.values: tuple[tuple[float, ...], ...] = tuple(tuple(float(x) for x in v) for v in weights.values)
        self.shape = tuple(len(v) for v in self.values)
        self.points: list[dict[str, float]] = weights.points()
        self.prefer = {n: float((prefer or {}).get(n, 0.0)) for n in self.names}
        self.max_elements = max_elements  # bounds the (G, B, K) score block held at once
        self._hits = torch.zeros(3, len(self.points), self.num_classes, dtype=torch.int64)
        self._totals = torch.zeros(2, self.num_classes, dtype=torch.int64)
        self._bad: dict[str, Tensor] = {}
        self._protocol: ClassProtocol | None = None
        self._table_cache: dict[tuple[str, ...], Tensor] = {}

    def _table(self, names: Sequence[str]) -> Tensor:
        """(G, P) float64: each part's factor at every grid point (built once per set of part names)."""
        key = tuple(names)
        if key not in self._table_cache:
            self._table_cache[key] = torch.tensor([list(self.coefficients(p, names)) for p in self.points],
                                                  dtype=torch.float64).reshape(len(self.points), len(names))
        return self._table_cache[key]

    @torch.no_grad()
    def update(self, parts: Mapping[str, Tensor], labels: Tensor, protocol: ClassProtocol, *, side: Side) -> None:
        """Add a batch of score parts {name: (B, K)} with labels (B,).

        Scores of all grid points come from one GEMM, factors (G, P) x parts (P, B*A) over the A
        active classes; counts equal GZSLCounts on the combined scores at each point except where
        two classes' scores tie to within float rounding (the operation order differs).
        """
        names = list(parts)
        if not names:
            raise ConfigError("score parts", "at least one (B, K) score part", "none", "WeightSearch")
        first = parts[names[0]]
        b, k = first.shape
        if k != self.num_classes:
            raise ConfigError("score parts", f"(B, {self.num_classes})", tuple(first.shape), "WeightSearch")
        dev = first.device
        labels = _check_labels(labels.to(dev), protocol, side, b)
        bad = _invalid(labels, protocol, side)
        self._bad[side] = self._bad[side].to(dev) + bad if side in self._bad else bad
        self._protocol = protocol
        labels = labels.clamp(0, k - 1)  # a wrong label fails when the counts are read
        cols = _columns(protocol, dev)
        a = cols.active.numel()
        dtype = torch.promote_types(first.dtype, torch.float32)
        stacked = torch.stack([parts[n].detach().to(dtype)[:, cols.active] for n in names])  # (P, B, A)
        w = self._table(names).to(device=dev, dtype=dtype)  # (G, P)
        g = w.shape[0]
        rows = max(1, self.max_elements // max(1, g * a))  # samples per chunk: bounds the (G, b, A) block
        hits = torch.zeros(3, g, k, dtype=torch.int64, device=dev)
        for lo in range(0, b, rows):
            y = labels[lo:lo + rows]
            chunk = stacked[:, lo:lo + rows]  # (P, b, A)
            scores = (w @ chunk.reshape(len(names), -1)).reshape(g, -1, a)  # (G, b, A)
            pred, pred_t = _predict(scores, cols, self.calibration, with_t=side == "unseen")  # (G, b)
            if side == "seen":
                hits[0] += _bincount(y, pred == y, k)
            else:
                assert pred_t is not None
                hits[1] += _bincount(y, pred == y, k)
                hits[2] += _bincount(y, pred_t == y, k)
        side_totals = torch.zeros_like(self._totals, device=dev)
        side_totals[0 if side == "seen" else 1] = torch.bincount(labels, minlength=k)
        self._hits = self._hits.to(dev) + hits  # on the device: nothing here waits for it
        self._totals = self._totals.to(dev) + side_totals

    def _host(self) -> None:
        """The deferred label check, and the counts back on the host (once, when they are read)."""
        if self._protocol is not None:
            bad, self._bad, protocol, self._protocol = self._bad, {}, self._protocol, None
            _raise_invalid(bad, protocol)
        if self._hits.device.type != "cpu":
            self._hits, self._totals = self._hits.cpu(), self._totals.cpu()

    @property
    def hits(self) -> Tensor:
        self._host()
        return self._hits

    @hits.setter
    def hits(self, value: Tensor) -> None:
        self._hits = value

    @property
    def totals(self) -> Tensor:
        self._host()
        return self._totals

    @totals.setter
    def totals(self, value: Tensor) -> None:
        self._totals = value

    def tensor(self) -> Tensor:
        """All counts as one flat int64 tensor, for one all_reduce(SUM)."""
        return torch.cat([self.hits.reshape(-1), self.totals.reshape(-1)])

    def load_tensor(self, t: Tensor) -> None:
        """Replace the counts by `t` (e.g. the all-reduced `tensor()`)."""
        t = torch.as_tensor(t).reshape(-1).cpu()
        if t.numel() != self.hits.numel() + self.totals.numel() or t.dtype != torch.int64:
            raise ConfigError("counts", f"an int64 tensor of {self.hits.numel() + self.totals.numel()} counts",
                              f"{t.dtype} of {t.numel()}", "WeightSearch")
        self.hits = t[: self.hits.numel()].reshape(self.hits.shape).clone()
        self.totals = t[self.hits.numel():].reshape(self.totals.shape).clone()

    def counts_at(self, index: int) -> GZSLCounts:
        """The GZSLCounts of grid point `points[index]`."""
        out = GZSLCounts(self.num_classes)
        out.counts[_S_HIT], out.counts[_U_HIT], out.counts[_T_HIT] = self.hits[:, index]
        out.counts[_S_N], out.counts[_U_N] = self.totals
        return out

    def _blocks(self) -> Tensor:
        """(G, 5, K) counts in GZSLCounts row order."""
        g, k = self.hits.shape[1:]
        tot = self.totals[:, None, :].expand(2, g, k)
        return torch.stack([self.hits[0], self.hits[1], self.hits[2], tot[0], tot[1]], dim=1)

    def metrics_grid(self, protocol: ClassProtocol) -> dict[str, Tensor]:
        """{'T', 'U', 'S', 'H'} each of `shape` (one axis per weight) float64."""
        return {k: v.reshape(self.shape) for k, v in _metrics(self._blocks(), protocol).items()}

    def best(self, protocol: ClassProtocol) -> tuple[dict[str, float], dict[str, float]]:
        """(weights, metrics) maximising H; ties -> closest to `prefer`, then the lowest grid index."""
        h = _metrics(self._blocks(), protocol)["H"]  # (G,)
        dist = torch.tensor([sum((p[n] - self.prefer[n]) ** 2 for n in self.names) for p in self.points],
                            dtype=torch.float64)
        top = h >= h.max() - 1e-12
        dist = torch.where(top, dist, torch.full_like(dist, float("inf")))
        i = int(torch.argmin(dist))  # argmin returns the first minimum: deterministic
        return dict(self.points[i]), self.counts_at(i).compute(protocol)


