"""dedn.data.clusters: manual tables, halving, k-means, resolution."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from dedn.data.clusters import halved_clusters, kmeans_clusters, manual_clusters, resolve_clusters
from dedn.data import validate_clusters
from dedn.errors import ConfigError, DatasetError
from dedn.data.sources import build_class_side, load_asset


@pytest.fixture(scope="module")
def sides():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {n: build_class_side(load_asset(n)) for n in ("CUB", "SUN", "AWA2")}


# docs/method.md#attribute-clusters
@pytest.mark.parametrize("name,d,sizes", [
    ("CUB", 312, [112, 87, 24, 40, 15, 34]),
    ("SUN", 102, [38, 27, 17, 20]),
    ("AWA2", 85, [18, 15, 38, 14]),
])
def test_manual_sizes_and_partition(name, d, sizes):
    m = manual_clusters(name, d)
    assert [len(v) for v in m.values()] == sizes
    ids = sorted(a for v in m.values() for a in v)
    assert ids == list(range(d))  # disjoint and covering
    validate_clusters(m, d, name)


# docs/method.md#attribute-clusters
def test_manual_exact_ranges():
    cub = manual_clusters("CUB", 312)
    assert cub["leg"] == list(range(263, 278))
    assert cub["wing"] == [*range(9, 24), *range(212, 217), *range(308, 312)]
    assert cub["head"][:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 94, 95, 96]
    sun = manual_clusters("SUN", 102)
    assert sun["light"] == [74, 75, 76, *range(85, 102)]
    awa = manual_clusters("AWA2", 85)
    assert awa["abstract"] == [*range(33, 64), *range(78, 85)]
    with pytest.raises(DatasetError, match="attribute ids in \\[0, 300\\)"):
        manual_clusters("CUB", 300)


# docs/method.md#attribute-clusters
def test_halved():
    h = halved_clusters(manual_clusters("CUB", 312))
    assert list(h) == ["head+torso", "wing+tail", "leg+whole"]
    assert [len(v) for v in h.values()] == [199, 64, 49]
    assert [len(v) for v in halved_clusters(manual_clusters("SUN", 102)).values()] == [65, 37]
    assert [len(v) for v in halved_clusters(manual_clusters("AWA2", 85)).values()] == [33, 52]
    assert list(halved_clusters({"a": [0], "b": [1], "c": [2]})) == ["a+b", "c"]


# docs/method.md#attribute-clusters
def test_kmeans_deterministic_partition(sides):
    wv = sides["SUN"].word_vectors  # has an all-zero row
    a, b = kmeans_clusters(wv, 4, seed=0), kmeans_clusters(wv, 4, seed=0)
    assert a == b and list(a) == ["kmeans_0", "kmeans_1", "kmeans_2", "kmeans_3"]
    validate_clusters(a, 102, "SUN")
    assert all(len(v) > 0 for v in a.values()) and a["kmeans_0"][0] == 0
    # two obvious groups are found
    x = np.vstack([np.tile([1.0, 0.0], (3, 1)), np.tile([0.0, 1.0], (2, 1))]) + 1e-3 * np.arange(10).reshape(5, 2)
    assert kmeans_clusters(x, 2) == {"kmeans_0": [0, 1, 2], "kmeans_1": [3, 4]}
    with pytest.raises(ConfigError, match="num_clusters"):
        kmeans_clusters(x, 6)


def test_resolve(sides):
    cub = sides["CUB"]
    assert [len(c) for c in resolve_clusters(cub, "manual")] == [112, 87, 24, 40, 15, 34]
    assert [len(c) for c in resolve_clusters(cub, "halved")] == [199, 64, 49]
    km = resolve_clusters(cub, "kmeans")
    assert len(km) == 6 and sorted(a for c in km for a in c) == list(range(312))
    assert len(resolve_clusters(cub, "kmeans", num_clusters=3)) == 3
    with pytest.raises(ConfigError, match="model.clusters"):
        resolve_clusters(cub, "random")
    # a dataset without manual clusters: kmeans works, manual is refused
    from dataclasses import replace
    apy = replace(cub, name="APY", clusters={})
    assert len(resolve_clusters(apy, "kmeans")) == 4
    with pytest.raises(ConfigError, match="'kmeans' for 'APY'"):
        resolve_clusters(apy, "manual")
