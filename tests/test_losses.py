"""DEDN losses against hand-written numpy on tiny examples (B=2, D=3, K=4)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dedn.families.dedn.config import DEDNLossConfig as LossConfig
from dedn.families.dedn.losses import dedn_loss
from dedn.nn.losses import (
    calibration_loss,
    cubic_distance,
    mean_squared_distance,
    jsd,
    mal_loss,
    reference_mal_loss,
    squared_distance,
)
from dedn.families.dedn.model import DEDNOutput, ExpertOutput
from dedn.protocol import ClassProtocol

# K = 4: classes 0, 1 seen, 2 unseen, 3 inactive (e.g. a test class during selection)
PROT = ClassProtocol(seen=(0, 1), unseen=(2,), num_classes=4)
SEEN = np.array([True, True, False, False])
UNSEEN = np.array([False, False, True, False])
ACTIVE = SEEN | UNSEEN
P = np.array([[1.0, 0.5, -0.3, 9.0], [0.2, 2.0, 0.7, -4.0]])
Y = np.array([0, 1])


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _np_ce(z_rows, labels):
    """-log softmax(z)_y over the active classes, batch mean, by hand."""
    out = []
    for z, y in zip(z_rows, labels):
        act = [k for k in range(4) if ACTIVE[k]]
        out.append(-(z[y] - np.log(sum(np.exp(z[k]) for k in act))))
    return float(np.mean(out))


def _np_jsd(a, b):
    vals = []
    for x, y in zip(a, b):
        p, q = _softmax(x), _softmax(y)
        m = (p + q) / 2
        vals.append((np.sum(p * np.log(p / m)), np.sum(q * np.log(q / m))))
    v = np.array(vals)
    return 0.5 * (v[:, 0].mean() + v[:, 1].mean())


# docs/method.md#margin-aware-loss
def test_mal_eq15_by_hand():
    eps = 0.7
    z = []
    for row, y in zip(P, Y):
        zz = np.empty(4)
        for k in range(4):
            if k == y:
                zz[k] = row[k] - 2 * eps
            elif SEEN[k]:
                zz[k] = row[k] + eps
            else:
                zz[k] = row[k]
        z.append(zz)
    expected = _np_ce(z, Y)
    got = mal_loss(_t(P), torch.tensor(Y), torch.tensor(SEEN), torch.tensor(ACTIVE), eps)
    assert abs(got.item() - expected) < 1e-12
    # the inactive class 3 (score 9.0) takes no part
    p2 = P.copy()
    p2[:, 3] = -50
    assert abs(mal_loss(_t(p2), torch.tensor(Y), torch.tensor(SEEN), torch.tensor(ACTIVE), eps).item() - expected) < 1e-12


# docs/reference-variant.md#mal-as-coded
def test_mal_eps1_equals_reference_m3():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 4))
    y = torch.tensor([0, 1, 1, 0, 0])
    a = mal_loss(_t(p), y, torch.tensor(SEEN), torch.tensor(ACTIVE), 1.0)
    b = reference_mal_loss(_t(p), y, torch.tensor(SEEN), torch.tensor(ACTIVE), 3.0)
    assert abs(a.item() - b.item()) < 1e-12
    # and the reference form by hand: z = s + 1[seen] - m 1[k = y], m = 2
    z = [row + SEEN * 1.0 - 2.0 * (np.arange(4) == yy) for row, yy in zip(p, y.numpy())]
    c = reference_mal_loss(_t(p), y, torch.tensor(SEEN), torch.tensor(ACTIVE), 2.0)
    assert abs(c.item() - _np_ce(z, y.numpy())) < 1e-12


# docs/method.md#divergence-and-distance-terms (cubic: docs/reference-variant.md#distance-term)
def test_jsd_and_distances_by_hand():
    a = np.array([[0.1, 0.9, -0.4], [1.0, 0.0, 0.3]])
    b = np.array([[0.5, -0.2, 0.2], [1.0, 0.0, 0.3]])  # second row identical: d = 0
    assert abs(jsd(_t(a), _t(b)).item() - _np_jsd(a, b)) < 1e-12
    d = a - b
    assert abs(squared_distance(_t(a), _t(b)).item() - np.mean(np.sum(d**2, 1))) < 1e-12
    assert abs(mean_squared_distance(_t(a), _t(b)).item() - np.sum(d**2) / 6) < 1e-12  # 2 rows x 3 entries
    cubic = np.mean([np.sum(np.abs(r) ** 3) / np.linalg.norm(r) if np.linalg.norm(r) > 0 else 0.0 for r in d])
    ta = _t(a).requires_grad_()
    got = cubic_distance(ta, _t(b))
    assert abs(got.item() - cubic) < 1e-12
    got.backward()
    assert torch.isfinite(ta.grad).all() and ta.grad[1].abs().sum() == 0  # d = 0 guarded


# docs/reference-variant.md#calibration-at-test-and-self-calibration
def test_calibration_by_hand():
    z = P - SEEN * 1.0 + UNSEEN * 1.0  # biased scores
    mass = []
    for row in z:
        e = np.exp(row[ACTIVE])
        mass.append(np.exp(row[2]) / e.sum())
    expected = -np.log(np.mean(mass))
    got = calibration_loss(_t(P), torch.tensor(SEEN), torch.tensor(UNSEEN), torch.tensor(ACTIVE))
    assert abs(got.item() - expected) < 1e-12


def _out(seed=0, fine=True, channel=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(4, 3, generator=g, dtype=torch.float64)

    def ex():
        o_r = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
        o_c = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True) if channel else None
        o = o_r if o_c is None else o_r + o_c
        return ExpertOutput(o_region=o_r, o_channel=o_c, scores=o @ a.t())

    return DEDNOutput(coarse=ex(), fine=ex() if fine else None, class_attributes=a)


def _n(x):
    return x.detach().numpy()


# docs/method.md#total-loss
@pytest.mark.parametrize("distance", ["mse", "sse", "cubic"])
def test_total_eq18_paper(distance):
    cfg = LossConfig(beta=0.3, gamma=0.2, epsilon=1.0, distance=distance)
    out = _out()
    parts = dedn_loss(out, torch.tensor(Y), PROT, cfg, "paper")
    assert set(parts) == {"loss", "mal_c", "mal_f", "align_c", "align_f", "distill"}

    def dist(a, b):
        d = a - b
        t = {"mse": np.mean(d**2), "sse": np.mean(np.sum(d**2, 1)),
             "cubic": np.mean(np.sum(np.abs(d) ** 3, 1) / np.linalg.norm(d, axis=1))}[distance]
        return _np_jsd(a, b) + t

    pc, pf = _n(out.coarse.scores), _n(out.fine.scores)
    align_c = dist(_n(out.coarse.o_region), _n(out.coarse.o_channel))
    distill = dist(pc[:, ACTIVE], pf[:, ACTIVE])  # over active classes only
    assert abs(parts["align_c"].item() - align_c) < 1e-12
    assert abs(parts["distill"].item() - distill) < 1e-12
    mal_c = mal_loss(out.coarse.scores, torch.tensor(Y), torch.tensor(SEEN), torch.tensor(ACTIVE), 1.0)
    assert abs(parts["mal_c"].item() - mal_c.item()) < 1e-12
    total = parts["mal_c"] + 0.3 * parts["align_c"] + parts["mal_f"] + 0.3 * parts["align_f"] + 0.2 * parts["distill"]
    assert abs(parts["loss"].item() - total.item()) < 1e-12
    parts["loss"].backward()
    assert torch.isfinite(out.coarse.o_channel.grad).all() and out.fine.o_region.grad.abs().sum() > 0


# docs/reference-variant.md#distillation-on-biased-scores
def test_reference_variant_distills_biased_scores_and_uses_margin():
    cfg = LossConfig(beta=0.0, gamma=1.0, distance="cubic", reference_margin=2.0, calibration_weight=0.5)
    out = _out(1)
    parts = dedn_loss(out, torch.tensor(Y), PROT, cfg, "reference")
    assert set(parts) == {"loss", "mal_c", "mal_f", "distill", "cal_c", "cal_f"}  # beta = 0: no alignment
    bias = -1.0 * SEEN + 1.0 * UNSEEN
    pc, pf = _n(out.coarse.scores) + bias, _n(out.fine.scores) + bias
    d = (pc - pf)[:, ACTIVE]
    expected = _np_jsd(pc[:, ACTIVE], pf[:, ACTIVE]) + np.mean(np.sum(np.abs(d) ** 3, 1) / np.linalg.norm(d, axis=1))
    assert abs(parts["distill"].item() - expected) < 1e-12
    ref = reference_mal_loss(out.fine.scores, torch.tensor(Y), torch.tensor(SEEN), torch.tensor(ACTIVE), 2.0)
    assert abs(parts["mal_f"].item() - ref.item()) < 1e-12
    total = parts["mal_c"] + parts["mal_f"] + parts["distill"] + 0.5 * (parts["cal_c"] + parts["cal_f"])
    assert abs(parts["loss"].item() - total.item()) < 1e-12


# docs/method.md#total-loss
def test_switches():
    y = torch.tensor(Y)
    out = _out(2)
    base = LossConfig(beta=0.3, gamma=0.2)
    no_distill = dedn_loss(out, y, PROT, LossConfig(beta=0.3, gamma=0.2, distill=False), "paper")
    assert "distill" not in no_distill
    rest = no_distill["mal_c"] + no_distill["mal_f"] + 0.3 * (no_distill["align_c"] + no_distill["align_f"])
    assert abs(no_distill["loss"].item() - rest.item()) < 1e-12
    full = dedn_loss(out, y, PROT, base, "paper")
    assert abs(full["loss"].item() - (rest + 0.2 * full["distill"]).item()) < 1e-12

    no_align = dedn_loss(out, y, PROT, LossConfig(beta=0.3, gamma=0.2, align=False), "paper")
    assert "align_c" not in no_align and "align_f" not in no_align
    assert abs(no_align["mal_c"].item() - full["mal_c"].item()) < 1e-15

    ce = dedn_loss(out, y, PROT, LossConfig(mal=False, align=False, distill=False), "paper")
    logits = _n(out.coarse.scores)
    assert abs(ce["mal_c"].item() - _np_ce(list(logits), Y)) < 1e-12
    assert abs(ce["loss"].item() - (ce["mal_c"] + ce["mal_f"]).item()) < 1e-12

    single = dedn_loss(_out(2, fine=False), y, PROT, base, "paper")
    assert set(single) == {"loss", "mal_c", "align_c"}  # one expert: no distillation
    no_ca = dedn_loss(_out(2, channel=False), y, PROT, base, "paper")
    assert set(no_ca) == {"loss", "mal_c", "mal_f", "distill"}  # nothing to align without O_c
    assert "cal_c" not in full  # calibration_weight = 0: not computed
    with pytest.raises(ValueError, match="variant"):
        dedn_loss(out, y, PROT, base, "other")
