"""dedn.data.sources: xlsa17 files, safe word-vector loading, packaged assets, class side, splits."""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dedn.errors import DatasetError
from dedn.data.sources import (LOC_FIELDS, build_class_side, load_asset, load_att_splits, load_source,
                          load_word_vectors, make_splits)

from conftest import SHARED_DATA as SHARED

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data beside the checkout")


@pytest.fixture(scope="module")
def cub():
    return load_asset("CUB")


def test_cub_asset_counts(cub):
    cs = build_class_side(cub)
    splits = make_splits(cub.labels, cub.locs, seed=0)
    assert (cs.num_classes, cs.num_attributes, cs.word_dim) == (200, 312, 300)
    assert (len(cs.seen_classes), len(cs.unseen_classes)) == (150, 50)
    assert (len(cs.train_classes), len(cs.val_classes)) == (100, 50)
    assert [splits[s].size for s in ("trainval", "test_seen", "test_unseen")] == [7057, 1764, 2967]
    # xlsa17 train_loc/val_loc (5875 + 2946) also cover test_seen; selection keeps only trainval images
    assert cub.locs["train_loc"].size == 5875 and cub.locs["val_loc"].size == 2946
    assert (splits["train"].size + splits["val_seen"].size, splits["val_unseen"].size) == (4702, 2355)
    selection = np.concatenate([splits["train"], splits["val_seen"], splits["val_unseen"]])
    assert np.intersect1d(selection, splits["test_seen"]).size == 0
    assert np.setdiff1d(selection, splits["trainval"]).size == 0
    # labels index allclasses_names (xlsa17 order, not 001..200): image 0 is a Black-footed Albatross
    assert cub.class_names[0] == "002.Laysan_Albatross" and cub.class_names[cub.labels[0]] == "001.Black_footed_Albatross"
    assert cs.attribute_names[1] == "has_bill_shape::dagger"
    np.testing.assert_allclose(np.linalg.norm(cs.attributes, axis=1), 1.0, atol=1e-6)
    assert cs.attributes.dtype == np.float32 and cs.attributes_raw.max() == 100.0


def test_make_splits_stratified_and_seeded(cub):
    a, b, c = (make_splits(cub.labels, cub.locs, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["val_seen"], c["val_seen"])
    assert np.intersect1d(a["train"], a["val_seen"]).size == 0
    train_loc = np.intersect1d(cub.locs["train_loc"], cub.locs["trainval_loc"])
    np.testing.assert_array_equal(np.union1d(a["train"], a["val_seen"]), train_loc)
    train_classes = np.unique(cub.labels[cub.locs["train_loc"]])
    for split in ("train", "val_seen"):  # every train class keeps images on both sides
        np.testing.assert_array_equal(np.unique(cub.labels[a[split]]), train_classes)
    # about 20 % per class
    k = train_classes[0]
    n_k = np.count_nonzero(cub.labels[train_loc] == k)
    assert np.count_nonzero(cub.labels[a["val_seen"]] == k) == round(0.2 * n_k)


def test_make_splits_small_classes():
    # train classes 0-2 (1, 2 and 10 trainval images), val class 3, a test_seen image of 2, an unseen class 4
    labels = np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 4])
    locs = {"trainval_loc": np.arange(14), "test_seen_loc": np.array([14]), "test_unseen_loc": np.array([15]),
            "train_loc": np.append(np.arange(13), 14), "val_loc": np.array([13])}
    s = make_splits(labels, locs, seed=3)
    assert 0 in s["train"] and 0 not in s["val_seen"]  # a lone image trains
    assert np.count_nonzero(labels[s["val_seen"]] == 1) == 1 and np.count_nonzero(labels[s["val_seen"]] == 2) == 2


@needs_shared
@pytest.mark.parametrize("name", ["CUB", "SUN", "AWA2"])
def test_packaged_assets_equal_shared_files(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shared, packed = load_source(name, SHARED / name), load_source(name)
        a, b = build_class_side(shared), build_class_side(packed)
    for field in ("class_names", "attribute_names", "clusters"):
        assert getattr(a, field) == getattr(b, field)
    for field in ("attributes_raw", "attributes", "word_vectors", "seen_classes", "unseen_classes",
                  "train_classes", "val_classes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(shared.labels, packed.labels)
    for f in LOC_FIELDS:
        np.testing.assert_array_equal(shared.locs[f], packed.locs[f])
    assert (SHARED.parent / "data").is_dir() and (Path(__file__).parents[1] / "dedn/data/assets" / f"{name}.npz").stat().st_size < 1.5 * 2**20


@needs_shared
def test_shared_locs_are_zero_based():
    src = load_source("CUB", SHARED / "CUB")
    z = np.load(SHARED / "CUB/image_labels.npz")
    for f in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
        np.testing.assert_array_equal(src.locs[f], z[f])


def test_awa2_clamps_missing_values_with_one_warning():
    src = load_asset("AWA2")
    assert np.count_nonzero(src.original_att < 0) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cs = build_class_side(src)
    assert len(caught) == 1 and "4 negative values" in str(caught[0].message)
    assert cs.attributes_raw.min() == 0.0
    assert len(cs.clusters["manual"]) == 4 and len(cs.clusters["halved"]) == 2


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_safe_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DatasetError, match=r"evil.pkl: pickle: .*refused global (posix|os|nt)\.system"):
        load_word_vectors(bad)
    assert not (tmp_path / "pwned-by-pickle").exists()
    # a list of arrays needs no forbidden global but is not an array
    lst = tmp_path / "list.pkl"
    lst.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DatasetError, match="content: expected a numpy array"):
        load_word_vectors(lst)


@needs_shared
def test_safe_unpickler_accepts_real_cub_vectors():
    wv = load_word_vectors(SHARED / "CUB/CUB_attribute.pkl")
    with open(SHARED / "CUB/CUB_attribute.pkl", "rb") as f:
        ref = pickle.load(f)  # trusted file: plain pickle as the independent reference
    assert wv.shape == (312, 300) and wv.dtype == np.float32
    np.testing.assert_array_equal(wv, ref.astype(np.float32))


def test_word_vector_formats_and_errors(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    np.save(tmp_path / "w.npy", x)
    np.savetxt(tmp_path / "w.txt", x)
    (tmp_path / "w.pkl").write_bytes(pickle.dumps(x))
    for suffix in ("npy", "txt", "pkl"):
        np.testing.assert_allclose(load_word_vectors(tmp_path / f"w.{suffix}"), x, rtol=1e-6)
    with pytest.raises(DatasetError, match="--word-vectors FILE"):
        load_word_vectors(tmp_path / "APY_attribute.pkl")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]]))
    with pytest.raises(DatasetError, match="nan.npy: values: expected finite values, found 1 NaN/inf"):
        load_word_vectors(tmp_path / "nan.npy")
    np.save(tmp_path / "v.npy", np.ones(3))
    with pytest.raises(DatasetError, match=r"shape: expected \(D, G\)"):
        load_word_vectors(tmp_path / "v.npy")


def _att_mat(tmp_path, **changes):
    k, d = 4, 3
    locs = {"trainval_loc": [1, 2, 3], "test_seen_loc": [4], "test_unseen_loc": [5], "train_loc": [1, 2, 4],
            "val_loc": [3]}  # 1-based; train_loc may hold a test_seen image, as xlsa17's do
    mat = {"att": np.ones((d, k)), "original_att": np.ones((d, k)),
           "allclasses_names": np.array([[np.array([f"c{i}"])] for i in range(k)], dtype=object),
           **{f: np.array(v, dtype=np.uint16)[:, None] for f, v in locs.items()}}
    mat.update(changes)
    mat = {key: v for key, v in mat.items() if v is not None}
    path = tmp_path / "att_splits.mat"
    scipy.io.savemat(path, mat)
    return path


def test_load_att_splits_checks(tmp_path):
    s = load_att_splits(_att_mat(tmp_path))
    assert s.att.shape == (4, 3) and s.class_names == ("c0", "c1", "c2", "c3")
    np.testing.assert_array_equal(s.locs["train_loc"], [0, 1, 3])
    with pytest.raises(DatasetError, match=r"att_splits.mat: trainval_loc and test_seen_loc: expected no image in both "
                                           r"\(.*\), found 1 image in both, at 1-based indices \[3\]"):
        load_att_splits(_att_mat(tmp_path, test_seen_loc=np.array([[4], [3]])))
    with pytest.raises(DatasetError, match=r"keys: .*missing \['test_unseen_loc'\]"):
        load_att_splits(_att_mat(tmp_path, test_unseen_loc=None))
    with pytest.raises(DatasetError, match="original_att: expected a numeric D x K = 3 x 4"):
        load_att_splits(_att_mat(tmp_path, original_att=np.ones((3, 5))))
    with pytest.raises(DatasetError, match=r"train_loc: expected 1-based image indices \(>= 1\), found 0"):
        load_att_splits(_att_mat(tmp_path, train_loc=np.arange(0, 3)[:, None]))
    with pytest.raises(DatasetError, match="att: expected finite values"):
        load_att_splits(_att_mat(tmp_path, att=np.full((3, 4), np.nan)))
    with pytest.raises(DatasetError, match="no such file"):
        load_att_splits(tmp_path / "missing.mat")


def test_load_source_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        load_source("CUB", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="packaged class side"):
        load_source("APY")


# ---- att_splits.mat variants that circulate (issue 12, item 3) and the synthetic --word-vectors flag

def _variant_folder(root: Path, drop: tuple[str, ...], word_vectors: bool = True) -> Path:
    """A shared-style AWA2 folder (from the packaged asset) whose att_splits.mat lacks the `drop` keys."""
    from dedn.data.sources import source_to_arrays

    a = source_to_arrays(load_asset("AWA2"))
    root.mkdir(parents=True)
    mat = {"att": a["att"].T, "original_att": a["original_att"].T,
           "allclasses_names": np.array([[n] for n in a["class_names"]], dtype=object),
           **{f: a[f].astype(np.float64)[:, None] + 1 for f in LOC_FIELDS}}
    scipy.io.savemat(root / "att_splits.mat", {k: v for k, v in mat.items() if k not in drop})
    np.savez(root / "image_labels.npz", labels=a["labels"].astype(np.int64))
    if word_vectors:
        np.save(root / "AWA2_attribute.npy", a["word_vectors"])
    return root


def test_att_splits_without_train_and_val_loc_get_a_seeded_class_split(tmp_path):
    from dedn.data.sources import DerivedFieldWarning

    folder = _variant_folder(tmp_path / "awa2", drop=("train_loc", "val_loc"))
    with pytest.warns(DerivedFieldWarning, match=r"no train_loc/val_loc; validation classes drawn from the 40 "
                                                 r"trainval classes with seed 0: 13 validation classes"):
        a = load_source("AWA2", folder)
    with pytest.warns(DerivedFieldWarning):
        b, c = load_source("AWA2", folder), load_source("AWA2", folder, seed=1)
    seen = np.unique(a.labels[a.locs["trainval_loc"]])
    train, val = (np.unique(a.labels[a.locs[f]]) for f in ("train_loc", "val_loc"))
    assert (train.size, val.size) == (27, 13) and np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.union1d(train, val), seen)
    # every trainval image is in exactly one of the two, nothing else is
    np.testing.assert_array_equal(np.sort(np.concatenate([a.locs["train_loc"], a.locs["val_loc"]])),
                                  np.sort(a.locs["trainval_loc"]))
    np.testing.assert_array_equal(a.locs["val_loc"], b.locs["val_loc"])  # seeded: the same split again
    assert not np.array_equal(a.locs["val_loc"], c.locs["val_loc"])
    with pytest.warns(UserWarning, match="negative values"):  # AWA2's -1 marks, as for the full file
        cs = build_class_side(a)
    np.testing.assert_array_equal(cs.val_classes, val)
    splits = make_splits(a.labels, a.locs, seed=0)
    assert np.intersect1d(np.unique(a.labels[splits["val_unseen"]]), np.unique(a.labels[splits["train"]])).size == 0


def test_att_splits_only_one_of_train_and_val_loc_is_refused(tmp_path):
    folder = _variant_folder(tmp_path / "awa2", drop=("val_loc",))
    with pytest.raises(DatasetError, match=r"att_splits.mat: keys: expected both train_loc and val_loc, or neither"):
        load_source("AWA2", folder)


def test_att_splits_without_original_att_and_class_names_are_derived_with_warnings(tmp_path):
    from dedn.data.sources import DerivedFieldWarning

    folder = _variant_folder(tmp_path / "awa2", drop=("original_att", "allclasses_names"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = load_source("AWA2", folder)
    said = [str(w.message) for w in caught if issubclass(w.category, DerivedFieldWarning)]
    assert any("no original_att; the raw attribute values are taken from att" in m for m in said), said
    assert any("no allclasses_names and no allclasses.txt" in m for m in said), said
    assert src.class_names[:2] == ("class_000", "class_001") and len(src.class_names) == 50
    np.testing.assert_array_equal(src.original_att, src.att)
    # att's -1 marks are normalised (-0.0038, no longer exactly -1): no mark to set, the values are kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(build_class_side(src).attributes_raw, src.att)

    names = [f"animal {i}" for i in range(50)]
    (folder / "allclasses.txt").write_text("\n".join(names) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_source("AWA2", folder).class_names == tuple(names)
    assert any(re.search("class names taken from .*allclasses.txt", str(w.message)) for w in caught)
    (folder / "allclasses.txt").write_text("\n".join(names[:49]) + "\n")
    with pytest.raises(DatasetError, match=r"allclasses.txt: class names: expected 50 names, one per line"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", DerivedFieldWarning)  # the original_att one, said above
        load_source("AWA2", folder)


def test_synthetic_subcommand_takes_the_word_vectors_its_error_asks_for(tmp_path, capsys):
    from toydata import load_job

    prepare_data = load_job("prepare_data")
    folder = _variant_folder(tmp_path / "awa2", drop=("train_loc", "val_loc"), word_vectors=False)
    args = ["synthetic", "--name", "AWA2", "--source-dir", str(folder), "--channels", "8", "--height", "1",
            "--width", "1", "--images-per-class", "1", "--no-progress"]
    assert prepare_data.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "AWA2_attribute.pkl: file:" in err and "need `--word-vectors FILE`" in err
    assert not (tmp_path / "out").exists()
    wv = np.save(tmp_path / "vectors.npy", load_asset("AWA2").word_vectors) or tmp_path / "vectors.npy"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_data.main([*args, "--word-vectors", str(wv), "--out", str(tmp_path / "out")]) == 0
    assert any("no train_loc/val_loc" in str(w.message) for w in caught)
    from dedn.data import FeatureDataset

    ds = FeatureDataset.open(tmp_path / "out")
    assert ds.class_side.val_classes.size == 13 and ds.semi_synthetic
