"""Generalized zero-shot metrics: per-class mean top-1 T, U, S and H, and the (lambda_rc, lambda_e) search.

* S: samples of the seen-side split, argmax over the phase's active classes (seen + unseen);
* U: samples of the unseen-side split, argmax over the active classes;
* T: samples of the unseen-side split, argmax over the unseen classes only;
* H = 2 S U / (S + U).

Each figure is the mean over the classes (of that side, with at least one sample) of the
fraction of that class's samples predicted correctly. Calibrated stacking subtracts a constant
from the seen-class scores before the GZSL argmax (not for T, where only unseen classes compete).

Everything is accumulated as integer per-class counts held in ONE int64 tensor, so that a
distributed evaluation does a single `all_reduce(SUM)` and every rank then computes the same
figures. `LambdaSearch` keeps those counts for every point of a (lambda_rc, lambda_e) grid, from
the four cached score parts P_rc, P_cc, P_rf, P_cf (eqs. 8 and 19 are linear in them), so any
lambda is scored without running the network again.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from dedn.errors import ConfigError, DatasetError
from dedn.protocol import ClassProtocol

METRICS = ("T", "U", "S", "H")  # the order every table and log uses


def format_pct(v: float | None) -> str:
    """A metric fraction as a table cell: percent with one decimal, "-" when missing or not finite."""
    return "-" if v is None or not math.isfinite(v) else f"{100.0 * v:.1f}"

Side = Literal["seen", "unseen"]
PART_NAMES = ("P_rc", "P_cc", "P_rf", "P_cf")  # region/channel x coarse/fine (dedn.model)

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


def _predict(z: Tensor, cols: _Columns, calibration: float, with_t: bool) -> tuple[Tensor, Tensor | None]:
    """z (..., A) scores of the active classes -> (GZSL class ids (...,), T class ids (...,) | None).

    Ascending columns keep torch.argmax's first-maximum rule: ties go to the smallest class id.
    """
    zc = z - calibration * cols.seen_in_active.to(z.dtype) if calibration != 0.0 else z  # calibrated stacking
    pred = cols.active[zc.argmax(-1)]
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
    if side not in ("seen", "unseen"):
        raise ConfigError("side", "one of seen|unseen", side, "dedn.metrics")
    labels = labels.reshape(-1).long()
    if labels.numel() != n:
        raise DatasetError("evaluation batch", "labels", f"{n} labels (one per score row)", labels.numel())
    allowed = protocol.seen_mask(labels.device) if side == "seen" else protocol.unseen_mask(labels.device)
    if labels.numel() and (labels.min() < 0 or labels.max() >= protocol.num_classes or not bool(allowed[labels].all())):
        bad = labels[(labels < 0) | (labels >= protocol.num_classes)]
        if bad.numel() == 0:
            bad = labels[~allowed[labels]]
        raise DatasetError("evaluation batch", "labels", f"{side} classes of the protocol", f"class ids {sorted(set(bad.tolist()))[:10]}")
    return labels


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
        self.counts = torch.zeros(5, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, scores: Tensor, labels: Tensor, protocol: ClassProtocol, *, side: Side, calibration: float = 0.0) -> None:
        """Add a batch: scores (B, K), labels (B,) of classes of `side` ("seen" or "unseen")."""
        scores = scores.detach()
        labels = _check_labels(labels.to(scores.device), protocol, side, scores.shape[0])
        pred, pred_t = gzsl_predictions(scores, protocol, calibration)  # (B,), (B,)
        k = self.num_classes
        block = torch.zeros(5, k, dtype=torch.int64, device=scores.device)
        if side == "seen":
            block[_S_HIT] = _bincount(labels, pred == labels, k)
            block[_S_N] = torch.bincount(labels, minlength=k)
        else:
            block[_U_HIT] = _bincount(labels, pred == labels, k)
            block[_T_HIT] = _bincount(labels, pred_t == labels, k)
            block[_U_N] = torch.bincount(labels, minlength=k)
        self.counts += block.cpu()

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


def lambda_grid(step: float) -> list[float]:
    """0, step, 2 step, ..., 1 (1 always included), rounded so 0.05 * 3 prints as 0.15."""
    if not 0 < step <= 1:
        raise ConfigError("eval.lambda_grid_step", "in (0, 1]", step, "dedn.metrics")
    n = int(math.floor(1.0 / step + 1e-9))
    vals = [round(i * step, 10) for i in range(n + 1)]
    if vals[-1] < 1.0:
        vals.append(1.0)
    return vals


class LambdaSearch:
    """GZSL counts at every (lambda_rc, lambda_e) of a grid, from cached score parts.

    experts: "both" | "coarse" | "fine"; with one expert lambda_e is fixed (1 for coarse,
    0 for fine); without channel attention lambda_rc is fixed at 1. `prefer` = the configured
    (lambda_rc, lambda_e): among grid points with equal H, the closest one wins.
    Counts live in `hits` (3, N_rc, N_e, K) (S, U, T) and `totals` (2, K) (seen, unseen side).
    """

    def __init__(self, num_classes: int, step: float = 0.05, experts: str = "both", *, channel_attention: bool = True,
                 calibration: float = 0.0, prefer: tuple[float, float] = (0.8, 0.9), max_elements: int = 1 << 24):
        if experts not in ("both", "coarse", "fine"):
            raise ConfigError("model.experts", "one of both|coarse|fine", experts, "LambdaSearch")
        self.num_classes = int(num_classes)
        self.experts, self.channel_attention, self.calibration = experts, channel_attention, float(calibration)
        self.rc_values = lambda_grid(step) if channel_attention else [1.0]
        self.e_values = lambda_grid(step) if experts == "both" else [1.0 if experts == "coarse" else 0.0]
        self.prefer = (float(prefer[0]), float(prefer[1]))
        self.max_elements = max_elements  # bounds the (n_rc, n_e, B, K) score block held at once
        n_rc, n_e, k = len(self.rc_values), len(self.e_values), self.num_classes
        self.hits = torch.zeros(3, n_rc, n_e, k, dtype=torch.int64)
        self.totals = torch.zeros(2, k, dtype=torch.int64)
        self._weight_cache: dict[tuple[str, ...], Tensor] = {}

    @property
    def grid(self) -> list[tuple[float, float]]:
        return [(rc, e) for rc in self.rc_values for e in self.e_values]

    def _weights(self, names: Sequence[str]) -> Tensor:
        """(n_rc * n_e, len(names)) float64: each part's weight in eqs. 8 and 19 at every grid point.

        P_r* get lambda_rc, P_c* get 1 - lambda_rc (or 1 without channel parts); coarse parts
        get lambda_e, fine parts 1 - lambda_e (or 1 with one expert).
        """
        key = tuple(names)
        if key in self._weight_cache:  # the same parts every batch: build the table once
            return self._weight_cache[key]
        both = any(n.endswith("c") for n in names) and any(n.endswith("f") for n in names)
        rows = []
        for rc in self.rc_values:
            for e in self.e_values:
                row = []
                for n in names:
                    w_rc = (rc if n.startswith("P_r") else 1.0 - rc) if self.channel_attention else 1.0
                    w_e = (e if n.endswith("c") else 1.0 - e) if both else 1.0
                    row.append(w_rc * w_e)
                rows.append(row)
        self._weight_cache[key] = torch.tensor(rows, dtype=torch.float64)
        return self._weight_cache[key]

    @torch.no_grad()
    def update(self, parts: dict[str, Tensor], labels: Tensor, protocol: ClassProtocol, *, side: Side) -> None:
        """Add a batch of score parts {name: (B, K)} (DEDNOutput.score_parts()) with labels (B,).

        Scores of all grid points come from one GEMM, weights (G, P) x parts (P, B*A) over the
        A active classes; counts equal GZSLCounts on `combine_score_parts` at each grid point
        except where two classes' scores tie to within float rounding (the operation order differs).
        """
        need = {"coarse": ["P_rc"], "fine": ["P_rf"], "both": ["P_rc", "P_rf"]}[self.experts]
        if self.channel_attention:
            need += [n.replace("P_r", "P_c") for n in need]
        missing = [n for n in need if n not in parts]
        if missing:
            raise ConfigError("score parts", f"parts {need} (experts={self.experts}, channel_attention={self.channel_attention})",
                              f"missing {missing}", "LambdaSearch")
        names = [n for n in PART_NAMES if n in need]
        first = parts[names[0]]
        b, k = first.shape
        if k != self.num_classes:
            raise ConfigError("score parts", f"(B, {self.num_classes})", tuple(first.shape), "LambdaSearch")
        dev = first.device
        labels = _check_labels(labels.to(dev), protocol, side, b)
        cols = _columns(protocol, dev)
        a = cols.active.numel()
        dtype = torch.promote_types(first.dtype, torch.float32)
        stacked = torch.stack([parts[n].detach().to(dtype)[:, cols.active] for n in names])  # (P, B, A)
        w = self._weights(names).to(device=dev, dtype=dtype)  # (G, P)
        g = w.shape[0]
        n_rc, n_e = len(self.rc_values), len(self.e_values)
        rows = max(1, self.max_elements // max(1, g * a))  # samples per chunk: bounds the (G, b, A) block
        hits = torch.zeros(3, g, k, dtype=torch.int64, device=dev)
        for lo in range(0, b, rows):
            y = labels[lo:lo + rows]
            chunk = stacked[:, lo:lo + rows]  # (P, b, A)
            scores = (w @ chunk.reshape(len(names), -1)).reshape(g, -1, a)  # (G, b, A) eqs. 8 + 19
            pred, pred_t = _predict(scores, cols, self.calibration, with_t=side == "unseen")  # (G, b)
            if side == "seen":
                hits[0] += _bincount(y, pred == y, k)
            else:
                assert pred_t is not None
                hits[1] += _bincount(y, pred == y, k)
                hits[2] += _bincount(y, pred_t == y, k)
        self.hits += hits.reshape(3, n_rc, n_e, k).cpu()
        self.totals[0 if side == "seen" else 1] += torch.bincount(labels, minlength=k).cpu()

    def tensor(self) -> Tensor:
        """All counts as one flat int64 tensor, for one all_reduce(SUM)."""
        return torch.cat([self.hits.reshape(-1), self.totals.reshape(-1)])

    def load_tensor(self, t: Tensor) -> None:
        """Replace the counts by `t` (e.g. the all-reduced `tensor()`)."""
        t = torch.as_tensor(t).reshape(-1).cpu()
        if t.numel() != self.hits.numel() + self.totals.numel() or t.dtype != torch.int64:
            raise ConfigError("counts", f"an int64 tensor of {self.hits.numel() + self.totals.numel()} counts",
                              f"{t.dtype} of {t.numel()}", "LambdaSearch")
        self.hits = t[: self.hits.numel()].reshape(self.hits.shape).clone()
        self.totals = t[self.hits.numel():].reshape(self.totals.shape).clone()

    def counts_at(self, i_rc: int, i_e: int) -> GZSLCounts:
        """The GZSLCounts of grid point (rc_values[i_rc], e_values[i_e])."""
        out = GZSLCounts(self.num_classes)
        out.counts[_S_HIT], out.counts[_U_HIT], out.counts[_T_HIT] = self.hits[:, i_rc, i_e]
        out.counts[_S_N], out.counts[_U_N] = self.totals
        return out

    def _blocks(self) -> Tensor:
        """(n_rc, n_e, 5, K) counts in GZSLCounts row order."""
        n_rc, n_e, k = self.hits.shape[1:]
        tot = self.totals[:, None, None, :].expand(2, n_rc, n_e, k)
        return torch.stack([self.hits[0], self.hits[1], self.hits[2], tot[0], tot[1]], dim=2)

    def metrics_grid(self, protocol: ClassProtocol) -> dict[str, Tensor]:
        """{'T', 'U', 'S', 'H'} each (n_rc, n_e) float64."""
        return _metrics(self._blocks(), protocol)

    def best(self, protocol: ClassProtocol) -> tuple[float, float, dict[str, float]]:
        """(lambda_rc, lambda_e, metrics) maximising H; ties -> closest to `prefer`, then the lowest grid index."""
        grid = self.metrics_grid(protocol)
        h = grid["H"]
        rc = torch.tensor(self.rc_values, dtype=torch.float64)[:, None]
        e = torch.tensor(self.e_values, dtype=torch.float64)[None, :]
        dist = (rc - self.prefer[0]) ** 2 + (e - self.prefer[1]) ** 2  # (n_rc, n_e)
        top = h >= h.max() - 1e-12
        dist = torch.where(top, dist, torch.full_like(dist, float("inf")))
        flat = int(torch.argmin(dist.reshape(-1)))  # argmin returns the first minimum: deterministic
        i_rc, i_e = divmod(flat, len(self.e_values))
        return self.rc_values[i_rc], self.e_values[i_e], {k: float(v[i_rc, i_e]) for k, v in grid.items()}

