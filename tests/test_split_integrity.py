"""Issue 27, item 3: no leakage, no empty splits, no damaged values.

* overlapping split locations in att_splits.mat are refused by every conversion (from-xlsa17,
  from-hdf5, synthetic), naming att_splits.mat, the two splits and the 1-based indices;
* an image of a class outside its split's side is named against att_splits.mat;
* an empty split is refused when converting and when an existing dataset is opened (preflight);
* an existing dataset whose splits share sample ids is refused from the sample_id column alone;
* original_att values are kept as in the file, except AWA1/AWA2's documented -1 marks;
* the pooled-features note comes only after the inputs were read; image_labels.npz messages and
  the `image-labels` subcommand.

Inputs are a tiny xlsa17-style dataset written to tmp_path: K=6 classes of 6 images (N=36),
image i of class i // 6; seen 0-3 (train 0-1, val 2-3), unseen 4-5; in each seen class images
0-3 are trainval and 4-5 test_seen; train_loc / val_loc cover every image of their classes,
test_seen ones included, as xlsa17's do.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import SHARED_DATA
import scipy.io

from dedn.data import SPLITS, DatasetWriter, FeatureDataset, split_classes
from dedn.errors import DatasetError
from toydata import TOY_SHAPE, load_job, toy_class_side, write_toy_dataset

prepare_data = load_job("prepare_data")

K, PER, D, G, C = 6, 6, 5, 4, 3
N = K * PER
LABELS = np.repeat(np.arange(K), PER)
_img = np.arange(N)
LOCS = {  # 0-based; written 1-based to att_splits.mat
    "trainval_loc": _img[(LABELS < 4) & (_img % PER < 4)],
    "test_seen_loc": _img[(LABELS < 4) & (_img % PER >= 4)],
    "test_unseen_loc": _img[LABELS >= 4],
    "train_loc": _img[LABELS < 2],
    "val_loc": _img[(LABELS == 2) | (LABELS == 3)],
}


def write_inputs(folder: Path, name: str = "TINY", original_att: np.ndarray | None = None,
                 labels: np.ndarray = LABELS, **locs: np.ndarray) -> Path:
    """att_splits.mat, <name>_attribute.npy, res101.mat, features.h5 and image_labels.npz in `folder`.

    locs: 0-based replacements of LOC_FIELDS entries, written the same to att_splits.mat (1-based)
    and features.h5 (0-based).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    raw = rng.random((K, D)) * 10 if original_att is None else np.asarray(original_att, dtype=np.float64)
    att = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    loc = {**LOCS, **locs}
    names = np.empty((K, 1), dtype=object)
    for i in range(K):
        names[i, 0] = np.array([f"c{i}"])
    scipy.io.savemat(folder / "att_splits.mat", {
        "att": att.T, "original_att": raw.T, "allclasses_names": names,
        **{f: (np.asarray(v) + 1).astype(np.float64)[:, None] for f, v in loc.items()},
    })
    np.save(folder / f"{name}_attribute.npy", rng.standard_normal((D, G)))
    feats = rng.random((N, C)).astype(np.float32)
    files = np.empty((N, 1), dtype=object)
    for i in range(N):
        files[i, 0] = np.array([f"/authors/data/TINY/images/c{labels[i]}/img_{i:03d}.jpg"])
    scipy.io.savemat(folder / "res101.mat", {"features": feats.T.astype(np.float64),
                                             "labels": (labels + 1)[:, None].astype(np.float64),
                                             "image_files": files})
    with h5py.File(folder / "features.h5", "w") as f:
        f.create_dataset("feature_map", data=feats.reshape(N, C, 1, 1))
        f.create_dataset("labels", data=labels)
        for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
            f.create_dataset(key, data=np.asarray(loc[key]))
    np.savez(folder / "image_labels.npz", labels=labels.astype(np.int64))
    return folder


def run(command: str, folder: Path, out: Path, name: str = "TINY") -> int:
    """prepare_data.py `command` on the inputs in `folder`; its exit status."""
    common = ["--name", name, "--out", str(out), "--no-progress"]
    files = ["--att-splits", str(folder / "att_splits.mat"), "--word-vectors", str(folder / f"{name}_attribute.npy")]
    argv = {
        "from-xlsa17": ["from-xlsa17", "--res101", str(folder / "res101.mat"), *files, *common],
        "from-hdf5": ["from-hdf5", "--features", str(folder / "features.h5"), *files, *common],
        "synthetic": ["synthetic", "--source-dir", str(folder), "--channels", "2", "--height", "1", "--width", "1",
                      *common],
    }[command]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pooled-features note, derived-field notes
        return prepare_data.main(argv)


def test_the_tiny_inputs_convert_cleanly(tmp_path, capsys):
    folder = write_inputs(tmp_path / "in")
    for command in ("from-xlsa17", "from-hdf5", "synthetic"):
        assert run(command, folder, tmp_path / command) == 0, capsys.readouterr().err
        ds = FeatureDataset.open(tmp_path / command, verify="full")
        rows = {s: ds.split(s).num_rows for s in SPLITS}
        assert rows == {"trainval": 16, "test_seen": 8, "test_unseen": 12, "train": 6, "val_seen": 2,
                        "val_unseen": 8}, (command, rows)


# ---------------------------------------------------------------- 1. leakage in att_splits.mat

COMMANDS = ("from-xlsa17", "from-hdf5", "synthetic")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_test_seen_location_in_trainval_is_refused(tmp_path, capsys, command):
    """The reported case: test_seen_loc shares image 1 (1-based) with trainval_loc; it used to be
    written to both the trainval and the test_seen shards with exit 0."""
    leak = np.append(LOCS["test_seen_loc"], [0, 2])
    folder = write_inputs(tmp_path / "in", test_seen_loc=leak)
    assert run(command, folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'att_splits.mat'}: trainval_loc and test_seen_loc: expected no image "
                          "in both"), err
    assert "2 images in both, at 1-based indices [1, 3]" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_test_unseen_location_in_trainval_is_named_in_att_splits_not_in_the_labels(tmp_path, capsys, command):
    leak = np.append(LOCS["test_unseen_loc"], [3])  # image 4 (1-based), a trainval image of class c0
    folder = write_inputs(tmp_path / "in", test_unseen_loc=leak)
    assert run(command, folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'att_splits.mat'}: trainval_loc and test_unseen_loc: expected no "
                          "image in both"), err
    assert "1 image in both, at 1-based indices [4]" in err and "labels" not in err.split("expected")[0], err


def test_test_seen_and_test_unseen_sharing_an_image_is_refused(tmp_path, capsys):
    folder = write_inputs(tmp_path / "in", test_unseen_loc=np.append(LOCS["test_unseen_loc"], [4]))
    assert run("from-xlsa17", folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "att_splits.mat: test_seen_loc and test_unseen_loc: expected no image in both" in err, err
    assert "at 1-based indices [5]" in err


def test_train_loc_may_hold_test_seen_images_but_not_test_unseen_ones(tmp_path, capsys):
    # xlsa17's own layout (train_loc covers test_seen images too) converts; make_splits drops them
    folder = write_inputs(tmp_path / "ok")
    assert run("from-xlsa17", folder, tmp_path / "ok-out") == 0
    ds = FeatureDataset.open(tmp_path / "ok-out")
    assert ds.split("train").num_rows + ds.split("val_seen").num_rows == 8  # trainval images of classes 0-1
    folder = write_inputs(tmp_path / "bad", train_loc=np.append(LOCS["train_loc"], [30]))
    assert run("from-xlsa17", folder, tmp_path / "bad-out") == 2
    err = capsys.readouterr().err
    assert "att_splits.mat: train_loc and test_unseen_loc: expected no image in both" in err, err
    assert "at 1-based indices [31]" in err


def test_a_test_unseen_image_of_a_seen_class_is_named_against_att_splits(tmp_path, capsys):
    """Image 5 (1-based; class c0, a trainval class) moved from test_seen_loc (and train_loc) to test_unseen_loc."""
    folder = write_inputs(tmp_path / "in", test_seen_loc=LOCS["test_seen_loc"][1:],
                          train_loc=LOCS["train_loc"][LOCS["train_loc"] != 4],
                          test_unseen_loc=np.append(LOCS["test_unseen_loc"], [4]))
    for command in COMMANDS:
        assert run(command, folder, tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {folder / 'att_splits.mat'}: test_unseen_loc: expected images of unseen "
                              "classes only"), (command, err)
        assert "class 0 (c0) has 4 images in trainval_loc (1-based indices [1, 2, 3, 4]) and 1 in test_unseen_loc " \
               "(1-based indices [5])" in err, (command, err)


def test_a_test_seen_image_of_an_unseen_class_is_named_against_att_splits(tmp_path, capsys):
    folder = write_inputs(tmp_path / "in", test_unseen_loc=LOCS["test_unseen_loc"][1:],
                          test_seen_loc=np.append(LOCS["test_seen_loc"], [24]))
    assert run("from-xlsa17", folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'att_splits.mat'}: test_seen_loc: expected images of seen classes "
                          "only"), err
    assert "1 image of other classes, at 1-based indices [25] (class 4 (c4))" in err, err
    assert "res101.mat" in err  # the file the labels came from is named too


# ---------------------------------------------------------------- 2. empty splits

EMPTY = {  # split -> att_splits.mat changes (0-based) that leave it without images
    "train": dict(train_loc=LOCS["train_loc"][LOCS["train_loc"] % PER >= 4]),  # only test_seen images
    "val_seen": dict(train_loc=np.array([0, 6])),  # one trainval image per train class: it stays in train
    "val_unseen": dict(val_loc=LOCS["val_loc"][LOCS["val_loc"] % PER >= 4]),  # only test_seen images
}


@pytest.mark.parametrize("split", list(EMPTY))
def test_conversion_refuses_an_empty_split(tmp_path, capsys, split):
    folder = write_inputs(tmp_path / "in", **EMPTY[split])
    for command in COMMANDS:
        assert run(command, folder, tmp_path / "out") == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"error: {folder / 'att_splits.mat'}: splits.{split}: expected at least one image"), \
            (command, err)
        assert not (tmp_path / "out").exists()


def _empty_split_by_writer(root: Path, empty: str) -> Path:
    cs = toy_class_side()
    with DatasetWriter(root, class_side=cs, feature_shape=TOY_SHAPE) as w:
        for i, split in enumerate(SPLITS):
            labels = np.repeat(split_classes(cs, split), 0 if split == empty else 2)
            with w.split(split) as s:
                if labels.size:
                    s.add(1000 * i + np.arange(labels.size), labels,
                          np.ones((labels.size, *TOY_SHAPE), np.float32))
    return root


@pytest.mark.parametrize("split", SPLITS)
def test_opening_a_dataset_with_an_empty_split_is_refused(tmp_path, split):
    root = _empty_split_by_writer(tmp_path / "ds", split)
    for verify in ("none", "rows", "full"):
        with pytest.raises(DatasetError, match=rf"{root / 'dataset.json'}: splits.{split}.num_rows: expected at "
                                               r"least 1 row"):
            FeatureDataset.open(root, verify=verify)


def test_preflight_refuses_a_dataset_with_an_empty_split(tmp_path):
    """What a training run opens (dedn.training.preflight.open_dataset), for both protocols."""
    from dedn.config import build_config
    from dedn.training.preflight import open_dataset

    root = write_toy_dataset(tmp_path / "toy")
    m = json.loads((root / "dataset.json").read_text())
    m["splits"]["val_unseen"] = {"num_rows": 0, "shards": []}
    (root / "dataset.json").write_text(json.dumps(m))
    for protocol in ("select", "two_phase"):
        cfg = build_config(None, {"dataset": "TOY", "data.path": str(root), "protocol": protocol})
        with pytest.raises(DatasetError, match=r"dataset.json: splits.val_unseen.num_rows: expected at least 1 row"):
            open_dataset(cfg)


# ---------------------------------------------------------------- 2. existing datasets: shared sample ids

def _write_ids(root: Path, ids: dict[str, np.ndarray]) -> Path:
    cs = toy_class_side()
    with DatasetWriter(root, class_side=cs, feature_shape=TOY_SHAPE) as w:
        for split in SPLITS:
            n = ids[split].size
            with w.split(split) as s:
                s.add(ids[split], np.resize(split_classes(cs, split), n), np.ones((n, *TOY_SHAPE), np.float32))
    return root


def _ids(**shared: tuple[int, ...]) -> dict[str, np.ndarray]:
    base = {s: 100 * i + np.arange(4, dtype=np.int64) for i, s in enumerate(SPLITS)}
    base["train"], base["val_seen"], base["val_unseen"] = np.arange(0, 2), np.arange(2, 3), np.arange(3, 4)
    return {s: np.append(v, shared.get(s, ())).astype(np.int64) for s, v in base.items()}  # train etc. in trainval


def test_a_dataset_whose_selection_splits_lie_inside_trainval_opens(tmp_path):
    ds = FeatureDataset.open(_write_ids(tmp_path / "ds", _ids()), verify="full")
    assert ds.split("train").num_rows == 2


@pytest.mark.parametrize("a,b,extra", [
    ("trainval", "test_seen", {"test_seen": (1,)}),
    ("trainval", "test_unseen", {"test_unseen": (2, 3)}),
    ("test_seen", "test_unseen", {"test_unseen": (101,)}),
    ("train", "val_seen", {"val_seen": (0,)}),
    ("test_seen", "val_unseen", {"val_unseen": (102,)}),
])
def test_an_existing_dataset_with_splits_sharing_sample_ids_is_refused(tmp_path, a, b, extra):
    root = _write_ids(tmp_path / "ds", _ids(**extra))
    shared = sorted(v for vs in extra.values() for v in vs)
    for verify in ("rows", "full"):
        with pytest.raises(DatasetError) as info:
            FeatureDataset.open(root, verify=verify)
        msg = str(info.value)
        assert msg.startswith(f"{root / 'dataset.json'}: splits.{a} and splits.{b}: expected no sample_id in both"), msg
        assert f"{len(shared)} sample_id{'s' if len(shared) > 1 else ''} in both: {shared}" in msg, msg


def test_a_selection_only_open_checks_only_the_selection_splits(tmp_path):
    """A sweep never opens a test shard, so a trainval/test overlap is not its to see; the final run's is."""
    root = _write_ids(tmp_path / "ds", _ids(test_seen=(1,)))
    FeatureDataset.open(root, splits=("train", "val_seen", "val_unseen"))
    with pytest.raises(DatasetError, match="splits.trainval and splits.test_seen"):
        FeatureDataset.open(root)


# ---------------------------------------------------------------- 3. attribute values kept as in the file

def test_negative_attributes_of_other_datasets_are_kept_exactly(tmp_path, capsys):
    """FLO's original_att are sentence-embedding values, negative ones included: stored as the file has them."""
    raw = np.random.default_rng(5).standard_normal((K, D))
    raw[0, 0] = -1.0  # exactly -1 too: only AWA1/AWA2 document it as a missing-value mark
    folder = write_inputs(tmp_path / "in", name="FLO", original_att=raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prepare_data.main(["from-xlsa17", "--res101", str(folder / "res101.mat"), "--att-splits",
                                  str(folder / "att_splits.mat"), "--word-vectors", str(folder / "FLO_attribute.npy"),
                                  "--name", "FLO", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert not [w for w in caught if "original_att" in str(w.message)]
    ds = FeatureDataset.open(tmp_path / "out")
    np.testing.assert_array_equal(ds.class_side.attributes_raw, raw)


def test_awa2_sets_exactly_its_minus_one_marks_to_zero():
    from dedn.data.sources import build_class_side, load_asset

    src = load_asset("AWA2")
    marks = src.original_att == -1
    assert np.count_nonzero(marks) == 4 and np.count_nonzero(src.original_att < 0) == 4
    with pytest.warns(UserWarning, match=r"original_att holds 4 negative values that are AWA2's missing-value "
                                         r"marks \(exactly -1"):
        cs = build_class_side(src)
    np.testing.assert_array_equal(cs.attributes_raw[marks], 0.0)
    np.testing.assert_array_equal(cs.attributes_raw[~marks], src.original_att[~marks])
    # another negative value is no mark: kept, and so are AWA1's values other than -1
    from dataclasses import replace

    other = src.original_att.copy()
    other[1, 1] = -0.5
    for name in ("AWA2", "AWA1"):
        with pytest.warns(UserWarning, match="4 negative values"):
            cs = build_class_side(replace(src, name=name, original_att=other))
        assert cs.attributes_raw[1, 1] == -0.5 and cs.attributes_raw.min() == -0.5


# ---------------------------------------------------------------- 4. the pooled-features note

def test_the_pooled_features_note_comes_only_after_the_inputs_were_read(tmp_path):
    from dedn.data.convert import convert_xlsa17

    folder = write_inputs(tmp_path / "in")
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"not a MATLAB file at all\n" * 20)
    args = dict(att_splits=folder / "att_splits.mat", word_vectors=folder / "TINY_attribute.npy", name="TINY",
                progress=False)
    for res101, att in ((garbage, folder / "att_splits.mat"), (folder / "res101.mat", garbage)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(DatasetError, match="garbage.mat: file"):
                convert_xlsa17(res101, out=tmp_path / "out", **{**args, "att_splits": att})
        assert not [w for w in caught if "pooled features" in str(w.message)]
    with pytest.warns(UserWarning, match="pooled features give 1 x 1 maps"):
        convert_xlsa17(folder / "res101.mat", out=tmp_path / "out", **args)


# ---------------------------------------------------------------- 5. image_labels.npz

def test_a_missing_image_labels_npz_says_what_it_holds_and_how_to_make_it(tmp_path, capsys):
    folder = write_inputs(tmp_path / "in")
    (folder / "image_labels.npz").unlink()
    assert run("synthetic", folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'image_labels.npz'}: file: expected "), err
    for said in ("`labels`", "0-based class of every image", "res101.mat order", "trainval_loc", "image_files",
                 "prepare_data.py image-labels --res101 res101.mat --att-splits", "no such file"):
        assert said in err, (said, err)


def test_one_based_image_labels_name_the_file(tmp_path, capsys):
    folder = write_inputs(tmp_path / "in")
    np.savez(folder / "image_labels.npz", labels=LABELS + 1)
    assert run("synthetic", folder, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'image_labels.npz'}: labels: expected 0-based class ids in [0, 6)"), err
    assert "labels look 1-based" in err


def test_the_image_labels_subcommand_writes_what_synthetic_reads(tmp_path, capsys):
    folder = write_inputs(tmp_path / "in")
    (folder / "image_labels.npz").unlink()
    out = folder / "image_labels.npz"
    assert prepare_data.main(["image-labels", "--res101", str(folder / "res101.mat"), "--att-splits",
                              str(folder / "att_splits.mat"), "--out", str(out),
                              "--strip-prefix", "/authors/data/"]) == 0
    assert str(out) in capsys.readouterr().out
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(["labels", "trainval_loc", "test_seen_loc", "test_unseen_loc",
                                          "seenclasses", "unseenclasses", "image_files"])
        np.testing.assert_array_equal(z["labels"], LABELS)
        assert z["labels"].dtype == np.int64
        for f in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
            np.testing.assert_array_equal(z[f], LOCS[f])
        np.testing.assert_array_equal(z["seenclasses"], [0, 1, 2, 3])
        np.testing.assert_array_equal(z["unseenclasses"], [4, 5])
        assert z["image_files"][7] == "TINY/images/c1/img_007.jpg"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert run("synthetic", folder, tmp_path / "out") == 0
    # an overlap in att_splits.mat is refused here too, and nothing is written
    bad = write_inputs(tmp_path / "bad", test_seen_loc=np.append(LOCS["test_seen_loc"], [0]))
    (bad / "image_labels.npz").unlink()
    assert prepare_data.main(["image-labels", "--res101", str(bad / "res101.mat"), "--att-splits",
                              str(bad / "att_splits.mat"), "--out", str(bad / "image_labels.npz")]) == 2
    assert "trainval_loc and test_seen_loc: expected no image in both" in capsys.readouterr().err
    assert not (bad / "image_labels.npz").exists()


@pytest.mark.skipif(not (SHARED_DATA / "CUB" / "image_labels.npz").is_file(), reason="needs ../shared/data beside the checkout")
def test_image_labels_remade_from_res101_equal_the_shared_file(tmp_path):
    """The shared CUB image_labels.npz, remade from a res101.mat with its labels (1-based) and its image
    paths under an absolute prefix, and the real att_splits.mat: the same keys, dtypes and values."""
    from dedn.data.sources import write_image_labels

    shared = SHARED_DATA / "CUB"
    with np.load(shared / "image_labels.npz", allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    files = np.empty((ref["labels"].size, 1), dtype=object)
    for i, f in enumerate(ref["image_files"]):
        files[i, 0] = np.array(["/xlsa17-authors/images/" + f])
    scipy.io.savemat(tmp_path / "res101.mat", {"labels": (ref["labels"] + 1)[:, None].astype(np.float64),
                                               "image_files": files})
    out = write_image_labels(tmp_path / "res101.mat", shared / "att_splits.mat", tmp_path / "image_labels.npz",
                             strip_prefix="/xlsa17-authors/images/")
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(ref)
        for k, v in ref.items():
            assert z[k].dtype.kind == v.dtype.kind, k
            np.testing.assert_array_equal(z[k], v, err_msg=k)
