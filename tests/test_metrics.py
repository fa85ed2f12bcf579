"""Tests of dedn.metrics: hand-computed T/U/S/H, calibration, excluded classes, the count tensor, LambdaSearch."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dedn.errors import DatasetError
from dedn.families.base import weight_grid_values
from dedn.families.dedn.lambdas import LambdaSearch
from dedn.metrics import GZSLCounts, gzsl_predictions
from dedn.families.dedn.model import combine_score_parts
from dedn.protocol import ClassProtocol

# K = 5: seen 0, 1; unseen 2, 3; class 4 belongs to neither (excluded from every argmax).
PROTO = ClassProtocol(seen=(0, 1), unseen=(2, 3), num_classes=5)
SEEN_SCORES = torch.tensor([
    [5.0, 1.0, 0.0, 0.0, 9.0],  # label 0: 0 wins once class 4 is excluded
    [1.0, 2.0, 0.0, 0.0, 0.0],  # label 0: predicted 1
    [0.0, 3.0, 2.5, 0.0, 0.0],  # label 1: right; with calibration 1, class 2 (2.5 > 2) wins
])
SEEN_LABELS = torch.tensor([0, 0, 1])
UNSEEN_SCORES = torch.tensor([
    [3.5, 0.0, 3.0, 1.0, 0.0],  # label 2: GZSL -> 0; T -> 2; calibrated -> 2 (3 > 2.5)
    [0.0, 0.0, 2.0, 1.0, 10.0],  # label 3: -> 2 everywhere (4 excluded)
    [0.0, 0.0, 1.0, 2.0, 0.0],  # label 3: right
    [0.0, 0.0, 5.0, 1.0, 0.0],  # label 2: right
])
UNSEEN_LABELS = torch.tensor([2, 3, 3, 2])


def _counts(calibration: float) -> GZSLCounts:
    c = GZSLCounts(5)
    c.update(SEEN_SCORES, SEEN_LABELS, PROTO, side="seen", calibration=calibration)
    c.update(UNSEEN_SCORES[:2], UNSEEN_LABELS[:2], PROTO, side="unseen", calibration=calibration)
    c.update(UNSEEN_SCORES[2:], UNSEEN_LABELS[2:], PROTO, side="unseen", calibration=calibration)
    return c


# docs/method.md#gzsl-metrics
def test_hand_computed_metrics():
    m = _counts(0.0).compute(PROTO)
    # S: class 0 1/2, class 1 1/1 -> 0.75 (per-class mean; the sample mean would be 2/3)
    # U: class 2 1/2, class 3 1/2 -> 0.5; T: class 2 2/2, class 3 1/2 -> 0.75; H = 2*.75*.5/1.25
    assert m == pytest.approx({"T": 0.75, "U": 0.5, "S": 0.75, "H": 0.6})


# docs/method.md#calibrated-stacking
def test_calibration_shifts_seen_scores_only_for_gzsl():
    m = _counts(1.0).compute(PROTO)
    # S: class 0 1/2 (row 2 becomes [0, 1, 0, 0] -> 1), class 1 0/1 -> 0.25
    # U: class 2 2/2, class 3 1/2 -> 0.75; T unchanged 0.75; H = 2*.25*.75/1.0
    assert m == pytest.approx({"T": 0.75, "U": 0.75, "S": 0.25, "H": 0.375})


# docs/method.md#class-scores
def test_excluded_class_never_predicted():
    pred, pred_t = gzsl_predictions(torch.cat([SEEN_SCORES, UNSEEN_SCORES]), PROTO)
    assert 4 not in pred.tolist() and set(pred_t.tolist()) <= {2, 3}
    assert pred.tolist() == [0, 1, 1, 0, 2, 3, 2]


# docs/method.md#gzsl-metrics
def test_per_class_rows():
    rows = _counts(0.0).per_class_accuracy(PROTO)
    assert [(r.class_id, r.side, r.t_acc, r.gzsl_acc, r.n) for r in rows] == [
        (0, "seen", None, 0.5, 2), (1, "seen", None, 1.0, 1), (2, "unseen", 1.0, 0.5, 2), (3, "unseen", 0.5, 0.5, 2),
    ]


# docs/method.md#gzsl-metrics
def test_empty_side_and_zero_h():
    c = GZSLCounts(5)
    assert c.compute(PROTO) == {"T": 0.0, "U": 0.0, "S": 0.0, "H": 0.0}
    c.update(SEEN_SCORES, SEEN_LABELS, PROTO, side="seen")
    assert c.compute(PROTO)["S"] == pytest.approx(0.75) and c.compute(PROTO)["H"] == 0.0


def test_labels_of_the_wrong_side_raise_when_the_counts_are_read():
    """Checked once when the counts are read (on a GPU a check per batch waits for the device each time)."""
    c = GZSLCounts(5)
    c.update(UNSEEN_SCORES[:1], torch.tensor([2]), PROTO, side="seen")
    with pytest.raises(DatasetError, match="seen classes of the protocol.*class ids \\[2\\]"):
        c.compute(PROTO)
    c = GZSLCounts(5)
    c.update(SEEN_SCORES[:1], torch.tensor([4]), PROTO, side="unseen")
    with pytest.raises(DatasetError, match="unseen classes"):
        c.tensor()
    c = GZSLCounts(5)
    c.update(SEEN_SCORES[:2], torch.tensor([-3, 9]), PROTO, side="seen")
    with pytest.raises(DatasetError, match=r"2 labels of other classes, class ids \[-1, 5\]"):
        c.compute(PROTO)


def test_tensor_round_trip_and_sum_of_shards():
    whole = _counts(0.0)
    t = whole.tensor()
    assert t.dtype == torch.int64 and t.ndim == 1 and t.numel() == 5 * 5
    back = GZSLCounts.from_tensor(t)
    assert torch.equal(back.counts, whole.counts) and back.compute(PROTO) == whole.compute(PROTO)
    # Two "ranks" each see half of the data; the SUM of their tensors gives the whole.
    a, b = GZSLCounts(5), GZSLCounts(5)
    a.update(SEEN_SCORES[:2], SEEN_LABELS[:2], PROTO, side="seen")
    a.update(UNSEEN_SCORES[:1], UNSEEN_LABELS[:1], PROTO, side="unseen")
    b.update(SEEN_SCORES[2:], SEEN_LABELS[2:], PROTO, side="seen")
    b.update(UNSEEN_SCORES[1:], UNSEEN_LABELS[1:], PROTO, side="unseen")
    assert torch.equal(GZSLCounts.from_tensor(a.tensor() + b.tensor()).counts, whole.counts)


# docs/method.md#post-hoc-lambda-fit
def test_weight_grid_values():
    assert weight_grid_values(0.05) == pytest.approx([i / 20 for i in range(21)])
    assert len(weight_grid_values(0.05)) == 21 and weight_grid_values(0.05)[3] == 0.15
    assert weight_grid_values(0.3) == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0])


# ---- LambdaSearch ------------------------------------------------------------------------
P7 = ClassProtocol(seen=(0, 1, 2), unseen=(3, 4, 5), num_classes=7)  # class 6 excluded


def _random_parts(n: int, seed: int, names=("P_rc", "P_cc", "P_rf", "P_cf")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, 7, generator=g) for k in names}


def _labels(n: int, classes: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]


def _brute_force(parts, labels, side, rc, e, calibration) -> np.ndarray:
    """Plain numpy, one sample at a time: (5, K) counts in GZSLCounts row order."""
    p = {k: v.double().numpy() for k, v in parts.items()}
    out = np.zeros((5, 7), dtype=np.int64)
    for i, y in enumerate(labels.tolist()):
        expert = []
        for tag in "cf":
            if f"P_r{tag}" in p:
                r, c = p[f"P_r{tag}"][i], p.get(f"P_c{tag}")
                expert.append(r if c is None else rc * r + (1 - rc) * c[i])
        s = expert[0] if len(expert) == 1 else e * expert[0] + (1 - e) * expert[1]
        gz = [s[k] - (calibration if k in P7.seen else 0.0) if k in P7.seen + P7.unseen else -np.inf for k in range(7)]
        hit = int(np.argmax(gz) == y)
        if side == "seen":
            out[0, y] += hit
            out[3, y] += 1
        else:
            out[1, y] += hit
            out[2, y] += int(max(P7.unseen, key=lambda k: s[k]) == y)
            out[4, y] += 1
    return out


# docs/method.md#post-hoc-lambda-fit
@pytest.mark.parametrize("experts,names,calibration", [
    ("both", ("P_rc", "P_cc", "P_rf", "P_cf"), 0.0),
    ("both", ("P_rc", "P_cc", "P_rf", "P_cf"), 0.7),
    ("coarse", ("P_rc", "P_cc"), 0.3),
    ("fine", ("P_rf", "P_cf"), 0.0),
    ("both", ("P_rc", "P_rf"), 0.0),  # no channel attention
])
def test_lambda_search_matches_gzsl_counts_and_brute_force(experts, names, calibration):
    ca = "P_cc" in names or "P_cf" in names
    search = LambdaSearch(7, step=0.25, experts=experts, channel_attention=ca, calibration=calibration)
    batches = [(_random_parts(40, s), _labels(40, P7.seen if s % 2 == 0 else P7.unseen, s + 100), "seen" if s % 2 == 0 else "unseen")
               for s in range(4)]
    batches = [({k: v for k, v in p.items() if k in names}, y, side) for p, y, side in batches]
    for parts, y, side in batches:
        search.update(parts, y, P7, side=side)
    assert search.rc_values == ([0.0, 0.25, 0.5, 0.75, 1.0] if ca else [1.0])
    assert search.e_values == {"both": [0.0, 0.25, 0.5, 0.75, 1.0], "coarse": [1.0], "fine": [0.0]}[experts]
    for i_rc, rc in enumerate(search.rc_values):
        for i_e, e in enumerate(search.e_values):
            ref = GZSLCounts(7)
            brute = np.zeros((5, 7), dtype=np.int64)
            for parts, y, side in batches:
                ref.update(combine_score_parts(parts, rc, e), y, P7, side=side, calibration=calibration)
                brute += _brute_force(parts, y, side, rc, e, calibration)
            got = search.counts_at(i_rc, i_e).counts
            assert torch.equal(got, ref.counts), (rc, e)
            np.testing.assert_array_equal(got.numpy(), brute)
    # best() is the argmax of H over the grid
    rc, e, m = search.best(P7)
    grid = search.metrics_grid(P7)
    assert m["H"] == pytest.approx(float(grid["H"].max()))
    assert m == pytest.approx(search.counts_at(search.rc_values.index(rc), search.e_values.index(e)).compute(P7))


def test_lambda_search_tensor_round_trip():
    a, b, whole = (LambdaSearch(7, step=0.5) for _ in range(3))
    p1, p2 = _random_parts(10, 1), _random_parts(12, 2)
    y1, y2 = _labels(10, P7.seen, 3), _labels(12, P7.unseen, 4)
    a.update(p1, y1, P7, side="seen")
    b.update(p2, y2, P7, side="unseen")
    whole.update(p1, y1, P7, side="seen")
    whole.update(p2, y2, P7, side="unseen")
    merged = LambdaSearch(7, step=0.5)
    merged.load_tensor(a.tensor() + b.tensor())  # what all_reduce(SUM) gives
    assert torch.equal(merged.tensor(), whole.tensor())
    assert merged.best(P7) == whole.best(P7)


# docs/method.md#post-hoc-lambda-fit
def test_best_ties_go_to_the_configured_lambdas():
    p = _random_parts(30, 5, ("P_rc",))["P_rc"]
    parts = {k: p for k in ("P_rc", "P_cc", "P_rf", "P_cf")}  # every lambda gives the same scores
    for prefer, expected in (((0.8, 0.9), (0.8, 0.9)), ((0.33, 0.33), (0.35, 0.35)), ((0.0, 1.0), (0.0, 1.0))):
        s = LambdaSearch(7, step=0.05, prefer=prefer)
        s.update(parts, _labels(30, P7.seen, 6), P7, side="seen")
        s.update(parts, _labels(30, P7.unseen, 7), P7, side="unseen")
        rc, e, _ = s.best(P7)
        assert (rc, e) == pytest.approx(expected)


# docs/method.md#post-hoc-lambda-fit
def test_best_finds_the_only_good_lambda():
    # Coarse parts know the truth, fine parts are anti-correlated: lambda_e = 1 must win.
    y_s, y_u = _labels(50, P7.seen, 8), _labels(50, P7.unseen, 9)
    def parts(y):
        onehot = torch.nn.functional.one_hot(y, 7).float()
        return {"P_rc": onehot, "P_cc": onehot, "P_rf": -onehot, "P_cf": -onehot}
    s = LambdaSearch(7, step=0.1, prefer=(0.5, 0.5))
    s.update(parts(y_s), y_s, P7, side="seen")
    s.update(parts(y_u), y_u, P7, side="unseen")
    rc, e, m = s.best(P7)
    assert m == pytest.approx({"T": 1.0, "U": 1.0, "S": 1.0, "H": 1.0})
    assert e > 0.5 and rc == pytest.approx(0.5)  # rc is irrelevant here, so the tie goes to prefer


def test_lambda_search_is_fast():
    k, n = 200, 3000
    proto = ClassProtocol(seen=tuple(range(150)), unseen=tuple(range(150, 200)), num_classes=k)
    s = LambdaSearch(k, step=0.05)
    g = torch.Generator().manual_seed(0)
    parts = {name: torch.randn(n, k, generator=g) for name in ("P_rc", "P_cc", "P_rf", "P_cf")}
    y_s = torch.randint(0, 150, (n // 2,), generator=g)
    y_u = torch.randint(150, 200, (n - n // 2,), generator=g)
    t0 = time.perf_counter()
    for side, sl, y in (("seen", slice(0, n // 2), y_s), ("unseen", slice(n // 2, n), y_u)):
        for lo in range(0, y.numel(), 200):  # eval batches of 200
            s.update({kk: v[sl][lo:lo + 200] for kk, v in parts.items()}, y[lo:lo + 200], proto, side=side)
    s.best(proto)
    elapsed = time.perf_counter() - t0
    assert len(s.grid) == 441
    assert elapsed < 15.0, elapsed  # ~1.5 s on an idle 2-core CPU; generous so a loaded CI machine cannot flake it
