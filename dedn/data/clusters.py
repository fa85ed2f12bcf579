"""Attribute clusters V_1..V_Q for the fine-grained expert (fExp).

Schemes, each a partition of the D attributes {cluster name: [attribute ids]}:

* ``manual``: the paper's semantic groups (CUB and SUN as the paper intends, AWA2 as the
  reference code has them; docs/method.md#attribute-clusters, ranges in `MANUAL_CLUSTERS` below).
* ``halved``: consecutive pairs of the manual clusters merged, in order (CUB 6 -> 3, SUN 4 -> 2,
  AWA2 4 -> 2). The paper's "half the clusters" ablation does not say which clusters merge;
  merging neighbours in the paper's own order keeps related groups together (CUB head+torso,
  wing+tail, leg+whole) and is reproducible without any choice of ours beyond that order.
* ``kmeans``: k-means on row-normalised attribute word vectors, for any dataset.

Layouts (``model.cluster_layout``, `apply_cluster_layout`) rewrite resolved manual clusters:

* ``paper`` (default): the clusters as resolved.
* ``reference_sun``: the fExp clusters of the authors' SUN model file (core/DEDN_Sun.py), 64/27/9/2
  instead of the intended 38/27/17/20. That file labels attributes with a 102-vector
  ``indicator`` (0 everywhere), then sets ``indicator[38:65] = 1``, ``indicator[65-74] = 2``,
  ``indicator[77:85] = 2`` and ``indicator[74-77] = indicator[85-102] = 3``: the three spans
  written with '-' instead of ':' are subtractions, i.e. the single negative indices -9, -3
  and -17, so only attributes 93 (-> 2), 99 and 85 (-> 3) move. Cluster q is then
  ``indicator == q`` in ascending id order: {0-37, 65-76, 86-92, 94-98, 100, 101} (64),
  {38-64} (27), {77-84, 93} (9), {85, 99} (2). Only defined on SUN's manual division
  (docs/reference-variant.md#sun-the-authors-cluster-slip-and-low-rank-initialisation).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from dedn.data.class_side import ClassSide, normalize_rows
from dedn.data.format import validate_clusters
from dedn.errors import ConfigError, DatasetError

SCHEMES = ("manual", "halved", "kmeans")
LAYOUTS = ("paper", "reference_sun")


def _ranges(*spans: tuple[int, int]) -> list[int]:
    """Attribute ids of 0-based inclusive ranges."""
    return [a for lo, hi in spans for a in range(lo, hi + 1)]


# 0-based inclusive ranges (docs/method.md#attribute-clusters).
MANUAL_CLUSTERS: dict[str, dict[str, list[int]]] = {
    "CUB": {
        "head": _ranges((0, 8), (94, 104), (120, 166), (182, 196), (278, 307)),
        "torso": _ranges((24, 72), (105, 119), (197, 211), (236, 239), (244, 247)),
        "wing": _ranges((9, 23), (212, 216), (308, 311)),
        "tail": _ranges((73, 93), (167, 181), (240, 243)),
        "leg": _ranges((263, 277)),
        "whole": _ranges((217, 235), (248, 262)),
    },
    # As the paper intends (38/27/17/20); the reference code's slip gives 64/27/9/2.
    "SUN": {
        "function": _ranges((0, 37)),
        "instance": _ranges((38, 64)),
        "environment": _ranges((65, 73), (77, 84)),
        "light": _ranges((74, 76), (85, 101)),
    },
    # As the reference code has them (18/15/38/14); the paper's table says 18/14/13/40.
    "AWA2": {
        "texture": _ranges((0, 17)),
        "organ": _ranges((18, 32)),
        "abstract": _ranges((33, 63), (78, 84)),
        "environment": _ranges((64, 77)),
    },
}


def _reference_sun_indicator(num_attributes: int) -> np.ndarray:
    """The reference code's SUN cluster label of each attribute, slip included (module docstring)."""
    indicator = np.zeros(num_attributes, dtype=np.int64)
    indicator[38:65] = 1
    indicator[65 - 74] = 2  # sic: index -9 (attribute 93), meant 65:74
    indicator[77:85] = 2
    indicator[74 - 77] = indicator[85 - 102] = 3  # sic: indices -3 and -17 (99, 85), meant 74:77, 85:102
    return indicator


def reference_sun_clusters() -> list[list[int]]:
    """SUN's fExp clusters as the reference code forms them: sizes 64/27/9/2, ids ascending."""
    indicator = _reference_sun_indicator(102)  # SUN's D
    return [[int(a) for a in np.flatnonzero(indicator == q)] for q in range(4)]


def apply_cluster_layout(clusters: Sequence[Sequence[int]], layout: str) -> list[list[int]]:
    """Resolved clusters under `model.cluster_layout`: "paper" as given, "reference_sun" the slip.

    "reference_sun" needs SUN's manual division (38/27/17/20, in its order) and returns
    `reference_sun_clusters()`; clusters that already are those (a saved model's) pass
    unchanged, anything else is a ConfigError naming model.cluster_layout.
    """
    out = [[int(a) for a in q] for q in clusters]
    if layout not in LAYOUTS:
        raise ConfigError("model.cluster_layout", "one of " + "|".join(LAYOUTS), layout)
    if layout == "paper":
        return out
    ref = reference_sun_clusters()
    if out == ref:
        return out
    if out != [list(v) for v in MANUAL_CLUSTERS["SUN"].values()]:
        sizes = "/".join(str(len(q)) for q in out)
        raise ConfigError("model.cluster_layout",
                          "'paper' unless the clusters are SUN's manual division (38/27/17/20, D = 102)",
                          f"reference_sun on {len(out)} clusters of sizes {sizes}")
    return ref


def _validate(clusters: Mapping[str, Sequence[int]], num_attributes: int, where: str, field: str) -> None:
    validate_clusters(clusters, num_attributes, where, field)


def manual_clusters(name: str, num_attributes: int) -> dict[str, list[int]]:
    """The manual clusters of CUB, SUN or AWA2, checked against D = num_attributes."""
    if name not in MANUAL_CLUSTERS:
        raise DatasetError(name, "clusters.manual", f"a dataset with manual clusters ({sorted(MANUAL_CLUSTERS)})", repr(name))
    clusters = {k: list(v) for k, v in MANUAL_CLUSTERS[name].items()}
    _validate(clusters, num_attributes, name, "clusters.manual")
    return clusters


def halved_clusters(clusters: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Merge consecutive pairs of clusters in order (an odd last cluster stays alone); names joined by '+'."""
    items = list(clusters.items())
    out: dict[str, list[int]] = {}
    for i in range(0, len(items), 2):
        pair = items[i:i + 2]
        out["+".join(n for n, _ in pair)] = sorted(int(a) for _, ids in pair for a in ids)
    return out


def kmeans_clusters(word_vectors: np.ndarray, q: int, seed: int = 0) -> dict[str, list[int]]:
    """Q clusters by scikit-learn KMeans on row-normalised word vectors (D, G); deterministic, none empty.

    Clusters are named kmeans_0.. in order of their smallest attribute id, so the same
    partition always gets the same names.
    """
    from sklearn.cluster import KMeans  # scikit-learn (about 1 s): only k-means clusters need it

    x = normalize_rows(np.asarray(word_vectors))  # (D, G)
    d = x.shape[0]
    if not 1 <= q <= d:
        raise ConfigError("model.num_clusters", f"an int in [1, D={d}]", q)
    n_distinct = np.unique(x, axis=0).shape[0]
    if q > n_distinct:
        raise ConfigError("model.num_clusters", f"at most the {n_distinct} distinct word vectors", q)
    km = KMeans(n_clusters=q, n_init=10, random_state=seed).fit(x.astype(np.float64))
    groups = [np.flatnonzero(km.labels_ == c) for c in range(q)]
    # KMeans (Lloyd) can in principle leave a centre without points; n_distinct >= q makes that
    # practically impossible, but an empty cluster would break fExp, so check rather than trust.
    if any(g.size == 0 for g in groups):
        raise DatasetError("word_vectors", "clusters.kmeans", f"{q} non-empty clusters", "an empty cluster")
    groups.sort(key=lambda g: int(g[0]))
    return {f"kmeans_{i}": [int(a) for a in g] for i, g in enumerate(groups)}


def default_clusters(name: str, num_attributes: int) -> dict[str, dict[str, list[int]]]:
    """The schemes stored with a dataset: "manual" and "halved" where the paper defines manual clusters."""
    if name not in MANUAL_CLUSTERS:
        return {}
    manual = manual_clusters(name, num_attributes)
    return {"manual": manual, "halved": halved_clusters(manual)}


def kmeans_count(class_side: ClassSide, num_clusters: int = 0) -> int:
    """How many k-means clusters `model.num_clusters` asks for: itself, or with 0 as many as the manual
    division has (4 when the dataset has none)."""
    if num_clusters:
        return num_clusters
    stored = class_side.clusters or {}
    if "manual" in stored:
        return len(stored["manual"])
    if class_side.name in MANUAL_CLUSTERS:
        return len(MANUAL_CLUSTERS[class_side.name])
    return 4


def resolve_named_clusters(class_side: ClassSide, scheme: str, num_clusters: int = 0,
                           seed: int = 0) -> dict[str, list[int]]:
    """{cluster name: attribute ids} of scheme "manual", "halved" or "kmeans" (before any layout), checked.

    "manual"/"halved" come from the class side (stored with the dataset) or the built-in
    tables; "kmeans" makes `kmeans_count(class_side, num_clusters)` clusters, kmeans_0...
    """
    d = class_side.num_attributes
    if scheme not in SCHEMES:
        raise ConfigError("model.clusters", f"one of {list(SCHEMES)}", scheme)
    stored = class_side.clusters or {}
    if scheme == "kmeans":
        clusters = kmeans_clusters(class_side.word_vectors, kmeans_count(class_side, num_clusters), seed)
    elif scheme in stored:
        clusters = {k: [int(a) for a in v] for k, v in stored[scheme].items()}
    elif class_side.name in MANUAL_CLUSTERS:
        clusters = default_clusters(class_side.name, d)[scheme]
    else:
        raise ConfigError("model.clusters", f"'kmeans' for {class_side.name!r} (it has no {scheme!r} clusters)", scheme)
    _validate(clusters, d, class_side.name, f"clusters.{scheme}")
    return clusters


def resolve_clusters(class_side: ClassSide, scheme: str, num_clusters: int = 0, seed: int = 0,
                     layout: str = "paper") -> list[list[int]]:
    """Attribute ids of each cluster, in cluster order, for scheme "manual", "halved" or "kmeans".

    "manual"/"halved" come from the class side (stored with the dataset) or the built-in
    tables; "kmeans" with num_clusters=0 uses as many clusters as "manual" has (4 when the
    dataset has no manual clusters). `layout` (model.cluster_layout) is applied last; DEDN
    applies its cfg's layout to the clusters it is given as well (idempotent).
    """
    named = resolve_named_clusters(class_side, scheme, num_clusters, seed)
    return apply_cluster_layout([list(map(int, ids)) for ids in named.values()], layout)


def cluster_summary(clusters: Mapping[str, Sequence[int]], attribute_names: Sequence[str], max_names: int = 5) -> str:
    """One line naming each cluster's attributes: "kmeans_0 (3): red, blue, green; kmeans_1 (12): ..., ... (+7)".

    A cluster of more than `max_names` attributes shows its first `max_names` and how many more it holds.
    """
    parts = []
    for name, ids in clusters.items():
        shown = [str(attribute_names[int(a)]) for a in list(ids)[:max_names]]
        more = f", ... (+{len(ids) - max_names})" if len(ids) > max_names else ""
        parts.append(f"{name} ({len(ids)}): {', '.join(shown)}{more}")
    return "; ".join(parts)
