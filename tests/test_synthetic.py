"""dedn.data.synthetic: the semi-synthetic generator; dedn.analysis.baseline on it."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from dedn.analysis.baseline import evaluate_baseline, harmonic, per_class_accuracy, pooled_split
from dedn.data import SPLITS, FeatureDataset, split_classes
from dedn.errors import ConfigError
from dedn.data.sources import build_class_side, load_asset
from dedn.data.synthetic import SyntheticConfig, build_model, generate, plan_splits, presence_probability, render, write_synthetic


@pytest.fixture(scope="module")
def cub():
    return load_asset("CUB")


def test_render_shapes_nonnegative_deterministic(cub):
    cfg = SyntheticConfig(channels=32, height=4, width=5)
    model = build_model(cub, cfg)
    labels = cub.labels[:10]
    a = render(model, labels, cfg, np.random.default_rng(0))
    b = render(model, labels, cfg, np.random.default_rng(0))
    c = render(model, labels, cfg, np.random.default_rng(1))
    assert a.shape == (10, 32, 4, 5) and a.dtype == np.float32
    assert (a >= 0).all() and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    one = render(build_model(cub, SyntheticConfig(channels=8, height=1, width=1)), labels,
                 SyntheticConfig(channels=8, height=1, width=1), np.random.default_rng(0))
    assert one.shape == (10, 8, 1, 1) and (one > 0).all()


def test_model_structure(cub):
    cfg = SyntheticConfig(channels=256)
    m = build_model(cub, cfg)
    assert m.signatures.shape == (312, 256) and (np.count_nonzero(m.signatures, axis=1) == 4).all()
    # attributes of one manual cluster sit together: head places closer to each other than to leg places
    head, leg = list(range(0, 9)), list(range(263, 278))
    spread = np.linalg.norm(m.places[head] - m.places[head].mean(0), axis=1).mean()
    gap = np.linalg.norm(m.places[head].mean(0) - m.places[leg].mean(0))
    assert gap > 2 * spread
    p = presence_probability(np.array([[0.0, 50.0], [100.0, 25.0]]), cfg)  # per-attribute max -> v = [[0, 1], [1, .5]]
    expected = 1 / (1 + np.exp(-cfg.sharpness * (np.array([[0, 1], [1, 0.5]]) - cfg.threshold)))
    np.testing.assert_allclose(p, expected, rtol=1e-6)


def test_attribute_drives_signature_channels(cub):
    """Images of a class with an attribute show its signature channels more than images of a class without."""
    cfg = SyntheticConfig(channels=128, height=3, width=3)
    m = build_model(cub, cfg)
    raw = cub.original_att
    d = int(np.argmax(raw.max(0) - raw.min(0)))
    hi, lo = int(np.argmax(raw[:, d])), int(np.argmin(raw[:, d]))
    rng = np.random.default_rng(0)
    chans = np.flatnonzero(m.signatures[d])
    f_hi = render(m, np.full(400, hi), cfg, rng)[:, chans].mean(axis=(1, 2, 3))  # (400,)
    f_lo = render(m, np.full(400, lo), cfg, rng)[:, chans].mean(axis=(1, 2, 3))
    se = np.sqrt(f_hi.var() / f_hi.size + f_lo.var() / f_lo.size)
    assert (f_hi.mean() - f_lo.mean()) / se > 4  # a clear, not overwhelming, difference


def test_subsample_plan_and_generate(cub):
    cfg = SyntheticConfig(channels=4, height=2, width=2, images_per_class=2)
    plan = plan_splits(cub, cfg)
    full = plan_splits(cub, SyntheticConfig())
    for s in SPLITS:
        assert np.isin(plan[s], full[s]).all()
        counts = np.bincount(cub.labels[plan[s]])
        assert counts.max() == 2
        np.testing.assert_array_equal(np.unique(cub.labels[plan[s]]), np.unique(cub.labels[full[s]]))
    chunks = list(generate(cub, cfg, plan, chunk_size=100))
    ids = np.concatenate([c.sample_ids for c in chunks])
    np.testing.assert_array_equal(ids, np.unique(np.concatenate(list(plan.values()))))
    assert max(len(c.labels) for c in chunks) == 100
    np.testing.assert_array_equal(np.concatenate([c.labels for c in chunks]), cub.labels[ids])
    with pytest.raises(ConfigError, match="synthetic.channels"):
        SyntheticConfig(channels=0)


def test_write_synthetic_dataset(tmp_path):
    root = write_synthetic(tmp_path / "cub", "CUB", channels=8, height=3, width=3, images_per_class=1, progress=False)
    ds = FeatureDataset.open(root, verify="full")
    assert ds.semi_synthetic and ds.source == "synthetic" and ds.feature_shape == (8, 3, 3)
    assert ds.split("trainval").num_rows == 150 and ds.split("test_unseen").num_rows == 50
    assert ds.split("train").num_rows == 100 and ds.split("val_unseen").num_rows == 50
    assert list(ds.class_side.clusters) == ["manual", "halved"]
    assert ds.class_side.clusters["manual"]["leg"] == list(range(263, 278))
    for s in SPLITS:
        assert ds.split(s).num_rows == split_classes(ds.class_side, s).size


def test_per_class_accuracy_golden():
    # class 0: 1/2 right, class 1: 3/3 right -> mean 0.75 (not 4/5 per sample)
    assert per_class_accuracy(np.array([0, 1, 1, 1, 1]), np.array([0, 0, 1, 1, 1])) == pytest.approx(0.75)
    assert harmonic(0.5, 0.25) == pytest.approx(1 / 3)


def test_baseline_learnable_not_trivial(cub):
    """On a small CUB-shaped set the ridge baseline beats chance clearly but is far from perfect."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cs = build_class_side(cub)
    cfg = SyntheticConfig(channels=128, height=3, width=3, images_per_class=12)
    plan = plan_splits(cub, cfg)
    ids, labels, x = pooled_split(generate(cub, cfg, plan))
    where = {int(i): j for j, i in enumerate(ids)}

    def part(split):
        rows = np.array([where[int(i)] for i in plan[split]])
        return x[rows], labels[rows]

    r = evaluate_baseline(part("trainval"), part("test_seen"), part("test_unseen"), cs, cs.seen_classes, cs.unseen_classes)
    assert 3 * r.chance_T < r.T < 0.9
    assert 5 * r.chance_gzsl < r.H < 0.9
