"""SUN `variant=reference`: the authors' cluster slip (64/27/9/2) and unit low-rank W1 factors.

The paper's 38/27/17/20 clusters and the scaled factor stay the default.
Every test here: docs/reference-variant.md#sun-the-authors-cluster-slip-and-low-rank-initialisation
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from dedn.data.clusters import MANUAL_CLUSTERS, apply_cluster_layout, reference_sun_clusters, resolve_clusters
from dedn.config import build_config
from dedn.families.dedn.config import DEDNModelConfig as ModelConfig
from dedn.training.loop import build_model
from dedn.errors import ConfigError
from dedn.families.dedn.model import DEDN
from dedn.data.sources import build_class_side, load_asset

FEATURES = (16, 2, 2)  # C, H, W: tiny, the W1 factors are (G, 256) and (256, C)

# The reference code's fExp clusters, ids ascending within each (indicator == q).
REFERENCE_SUN = [
    [*range(0, 38), *range(65, 77), *range(86, 93), *range(94, 99), 100, 101],
    list(range(38, 65)),
    [*range(77, 85), 93],
    [85, 99],
]


@pytest.fixture(scope="module")
def sun():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_class_side(load_asset("SUN"))


@pytest.fixture(scope="module")
def cub():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_class_side(load_asset("CUB"))


def _model(cfg, side) -> DEDN:
    m = build_model(cfg, side, FEATURES)
    assert isinstance(m, DEDN)
    return m


def _subnets(m: DEDN):
    return [m.coarse, *m.fine]


def test_reference_variant_sets_both_switches_and_paper_keeps_defaults():
    ref, paper = build_config("sun", ["variant=reference"]).model, build_config("sun").model
    assert (ref.cluster_layout, ref.region_init, ref.region_rank) == ("reference_sun", "unit", 256)
    assert (paper.cluster_layout, paper.region_init) == ("paper", "scaled")
    assert (ModelConfig().cluster_layout, ModelConfig().region_init) == ("paper", "scaled")
    for ds in ("cub", "awa2"):  # only SUN's reference code has the slip
        m = build_config(ds, ["variant=reference"]).model
        assert (m.cluster_layout, m.region_init) == ("paper", "scaled")


def test_reference_clusters_are_the_authors_slip(sun):
    m = _model(build_config("sun", ["variant=reference"]), sun)
    assert [len(q) for q in m.clusters] == [64, 27, 9, 2]
    assert m.clusters == REFERENCE_SUN == reference_sun_clusters()
    assert sorted(a for q in m.clusters for a in q) == list(range(102))  # every attribute once
    assert [s.num_attributes for s in m.fine] == [64, 27, 9, 2]
    # resolve_clusters with the layout gives the same
    assert resolve_clusters(sun, "manual", layout="reference_sun") == REFERENCE_SUN


def test_paper_clusters_stay_the_default(sun):
    m = _model(build_config("sun"), sun)
    assert [len(q) for q in m.clusters] == [38, 27, 17, 20]
    assert m.clusters == [list(v) for v in MANUAL_CLUSTERS["SUN"].values()]
    assert resolve_clusters(sun, "manual") == m.clusters


def test_layout_is_idempotent_for_saved_clusters(sun):
    cfg = build_config("sun", ["variant=reference"])
    # a saved model's clusters (already the slip) come back unchanged, as registry loading passes them
    assert apply_cluster_layout(REFERENCE_SUN, "reference_sun") == REFERENCE_SUN
    m = build_model(cfg, sun, FEATURES)
    m2 = DEDN(cfg.model, word_vectors=torch.from_numpy(sun.word_vectors).float(),
              class_attributes=torch.from_numpy(sun.attributes).float(), clusters=m.clusters, feature_shape=FEATURES)
    assert m2.clusters == REFERENCE_SUN
    m2.load_state_dict(m.state_dict())


def test_reference_factors_have_unit_variance_entries(sun):
    m = _model(build_config("sun", ["variant=reference"]), sun)
    for s in _subnets(m):
        assert s.region_rank == 256
        for w in (s.w1a, s.w1b):
            assert abs(w.detach().std().item() - 1.0) < 0.05, tuple(w.shape)
            assert abs(w.detach().mean().item()) < 0.05
    w1 = m.coarse.full_w1().detach()  # product std ~ sqrt(256) = 16
    assert abs(w1.std().item() / 16.0 - 1.0) < 0.1


def test_default_factors_keep_the_scaled_form(sun):
    m = _model(build_config("sun", ["variant=reference", "model.region_init=scaled"]), sun)
    for s in _subnets(m):
        assert abs(s.w1a.detach().std().item() - 1.0) < 0.05
        assert abs(s.w1b.detach().std().item() * math.sqrt(256) - 1.0) < 0.05
    assert abs(m.coarse.full_w1().detach().std().item() - 1.0) < 0.1


def test_unit_init_draws_the_same_numbers_as_scaled():
    v, a = torch.randn(6, 4), torch.rand(3, 6)

    def make(init):
        torch.manual_seed(3)
        return DEDN(ModelConfig(region_rank=8, region_init=init), word_vectors=v, class_attributes=a,
                    clusters=[[0, 1, 2], [3, 4, 5]], feature_shape=(5, 2, 2))

    scaled, unit = make("scaled"), make("unit")
    for s, u in zip(_subnets(scaled), _subnets(unit)):
        torch.testing.assert_close(s.w1a, u.w1a)
        torch.testing.assert_close(s.w1b * math.sqrt(8), u.w1b)
    x = torch.randn(2, 5, 2, 2)
    assert torch.isfinite(unit(x).fine.scores).all()


@pytest.mark.parametrize("override,key", [
    ("model.cluster_layout=sun", "model.cluster_layout"),
    ("model.region_init=normal", "model.region_init"),
    ("model.clusters=kmeans", "model.cluster_layout"),  # the slip rewrites manual clusters only
    ("model.clusters=halved", "model.cluster_layout"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build_config("sun", ["variant=reference", override])
    assert e.value.key == key


def test_other_schemes_work_with_the_paper_layout():
    cfg = build_config("sun", ["variant=reference", "model.clusters=halved", "model.cluster_layout=paper"])
    assert (cfg.model.clusters, cfg.model.cluster_layout) == ("halved", "paper")


def test_reference_sun_layout_on_other_clusters_is_a_config_error(cub):
    cfg = build_config("cub", ["model.cluster_layout=reference_sun"])
    with pytest.raises(ConfigError) as e:
        build_model(cfg, cub, FEATURES)
    assert e.value.key == "model.cluster_layout"
    with pytest.raises(ConfigError) as e:
        apply_cluster_layout([[0, 1], [2, 3]], "reference_sun")
    assert e.value.key == "model.cluster_layout"
