"""k-means attribute clusters are shown and logged with their real number (issue 27 item 8).

A dataset without manual clusters (or model.clusters=kmeans) trains DEDN's fine expert on k-means
clusters; the run config the driver logs as params must carry how many there are (not
`model.num_clusters=0`), and the driver prints which attributes each one holds.
"""
from __future__ import annotations

import dataclasses
import warnings

import pytest

from dedn.config import build_config
from dedn.data.clusters import cluster_summary, resolve_clusters, resolve_named_clusters
from dedn.families import family_of
from toydata import TOY_SHAPE, toy_class_side


def _own_dataset():
    """The toy class side as a dataset of one's own: no manual clusters."""
    return dataclasses.replace(toy_class_side(), name="MYDATA", clusters={})


def _cfg(*over: str):
    return build_config(None, {"dataset": "MYDATA", **dict(o.split("=", 1) for o in over)})


def test_fallback_kmeans_logs_its_number_and_prints_its_members(capsys):
    side, cfg = _own_dataset(), _cfg()
    assert (cfg.model.clusters, cfg.model.num_clusters) == ("manual", 0)
    with pytest.warns(UserWarning, match=r"model.clusters: MYDATA has no manual attribute clusters; using k-means .*"
                                         r"model.num_clusters=4\)"):
        resolved = family_of(cfg).resolve(cfg, side)
    assert (resolved.model.clusters, resolved.model.num_clusters) == ("kmeans", 4)
    assert resolved.flat()["model.num_clusters"] == 4  # what start_training_run logs as params
    named = resolve_named_clusters(side, "kmeans", 0, cfg.optim.seed)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # one summary line
    line = out[0]
    assert line.startswith("DEDN fine-expert clusters on MYDATA: k-means, model.num_clusters=4: ")
    for name, ids in named.items():
        assert f"{name} ({len(ids)}): " + ", ".join(side.attribute_names[a] for a in ids) in line
    # the network built from the resolved config has those very clusters
    net = family_of(resolved).build(resolved, side, TOY_SHAPE)
    assert net.clusters == [list(v) for v in named.values()]


def test_explicit_kmeans_is_shown_too_and_keeps_an_explicit_count(capsys):
    side = toy_class_side()  # has manual clusters (4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chosen, not a fallback: no warning
        default = family_of(_cfg()).resolve(_cfg("model.clusters=kmeans"), side)
        three = family_of(_cfg()).resolve(_cfg("model.clusters=kmeans", "model.num_clusters=3"), side)
    assert default.model.num_clusters == 4  # as many as the manual division
    assert three.model.num_clusters == 3
    out = capsys.readouterr().out
    assert "TOY: k-means, model.num_clusters=4: kmeans_0 (" in out and "model.num_clusters=3:" in out
    # resolving again changes nothing (a resumed run, a trial's config)
    assert family_of(default).resolve(default, side) == default


def test_manual_clusters_are_left_as_they_are(capsys):
    cfg = _cfg()
    assert family_of(cfg).resolve(cfg, toy_class_side()) == cfg
    assert capsys.readouterr().out == ""


def test_summary_shortens_long_clusters_but_counts_every_attribute():
    names = tuple(f"attribute_{i}" for i in range(10))
    text = cluster_summary({"a": [0, 1, 2, 3, 4, 5, 6, 7], "b": [8, 9]}, names, max_names=3)
    assert text == "a (8): attribute_0, attribute_1, attribute_2, ... (+5); b (2): attribute_8, attribute_9"


def test_named_and_listed_resolution_agree():
    side = toy_class_side()
    for scheme in ("manual", "halved", "kmeans"):
        assert list(resolve_named_clusters(side, scheme).values()) == resolve_clusters(side, scheme)
    assert list(resolve_named_clusters(side, "manual")) == ["head", "torso", "wing", "tail"]
