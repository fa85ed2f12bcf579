"""dedn.data.convert and jobs/prepare_data.py: HDF5 feature maps and xlsa17 res101.mat into dataset directories.

Inputs are built in tmp_path from the real CUB class side (the packaged asset, equal to the
shared files), with tiny feature sizes.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io

from dedn.data.convert import convert_hdf5, convert_xlsa17
from dedn.data import FeatureDataset
from dedn.errors import DatasetError
from dedn.data.sources import LOC_FIELDS, load_asset
from toydata import load_job

prepare_data = load_job("prepare_data")  # jobs/prepare_data.py, loaded by file path (jobs/ is no package)

N, K, D = 11788, 200, 312


@pytest.fixture(scope="module")
def cub():
    return load_asset("CUB")


@pytest.fixture(scope="module")
def files(cub, tmp_path_factory):
    """att_splits.mat (1-based locs, D x K), word vectors .pkl, attributes.txt, as published."""
    d = tmp_path_factory.mktemp("cub_src")
    names = np.empty((K, 1), dtype=object)
    for i, n in enumerate(cub.class_names):
        names[i, 0] = np.array([n])
    scipy.io.savemat(d / "att_splits.mat", {
        "att": cub.att.T, "original_att": cub.original_att.T, "allclasses_names": names,
        **{f: (cub.locs[f] + 1).astype(np.uint16)[:, None] for f in LOC_FIELDS},
    })
    (d / "CUB_attribute.pkl").write_bytes(pickle.dumps(cub.word_vectors.astype(np.float64)))
    (d / "attributes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(cub.attribute_names)))
    return d


def features_for(ids: np.ndarray, c: int = 4, h: int = 1, w: int = 1) -> np.ndarray:
    """Values exact in float16 that encode the image id: feature[i, j] = (i % 250) + j / 8 (< 2048 eighths)."""
    base = (ids % 250).astype(np.float32)[:, None] + np.arange(c * h * w, dtype=np.float32)[None] / 8
    return base.reshape(len(ids), c, h, w)


def write_h5(path: Path, cub, *, c=4, h=1, w=1, drop=(), **override):
    data = {"feature_map": features_for(np.arange(N), c, h, w), "labels": cub.labels,
            **{f: cub.locs[f] for f in ("trainval_loc", "test_seen_loc", "test_unseen_loc")}, **override}
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if k not in drop:
                f.create_dataset(k, data=v)
    return path


def args(files):
    return dict(att_splits=files / "att_splits.mat", word_vectors=files / "CUB_attribute.pkl", name="CUB",
                attribute_dir=files, progress=False)


def read_split(ds: FeatureDataset, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tables = [pq.read_table(ds.shard_path(s)) for s in ds.split(split).shards]
    ids = np.concatenate([t.column("sample_id").to_numpy() for t in tables])
    labels = np.concatenate([t.column("label").to_numpy() for t in tables])
    feats = np.concatenate([t.column("features").combine_chunks().flatten().to_numpy() for t in tables])
    return ids, labels, feats.reshape(len(ids), *ds.feature_shape)


def test_hdf5_full_cub_counts_and_values(tmp_path, files, cub):
    out = convert_hdf5(write_h5(tmp_path / "cub.h5", cub), out=tmp_path / "ds", block_rows=4000, **args(files))
    ds = FeatureDataset.open(out, verify="full")
    cs = ds.class_side
    assert ds.source == "hdf5" and not ds.semi_synthetic and ds.feature_shape == (4, 1, 1)
    assert (cs.num_classes, len(cs.seen_classes), len(cs.unseen_classes)) == (200, 150, 50)
    assert (len(cs.train_classes), len(cs.val_classes)) == (100, 50)
    rows = {s: ds.split(s).num_rows for s in ds.splits}
    assert (rows["trainval"], rows["test_seen"], rows["test_unseen"]) == (7057, 1764, 2967)
    assert rows["train"] + rows["val_seen"] == 4702 and rows["val_unseen"] == 2355  # test_seen excluded
    assert cs.attribute_names[0] == "has_bill_shape::curved_(up_or_down)"
    ids, labels, feats = read_split(ds, "test_unseen")
    np.testing.assert_array_equal(np.sort(ids), np.sort(cub.locs["test_unseen_loc"]))
    np.testing.assert_array_equal(labels, cub.labels[ids])
    np.testing.assert_array_equal(feats, features_for(ids))
    np.testing.assert_allclose(cs.word_vectors, cub.word_vectors)


def test_hdf5_maps_subsampled_rows(tmp_path, files, cub):
    """A 2 x 3 grid keeps the C-major layout: the stored row reshapes back to the file's (C, H, W) map."""
    path = write_h5(tmp_path / "m.h5", cub, c=2, h=2, w=3)
    out = convert_hdf5(path, out=tmp_path / "ds", block_rows=1000, storage_dtype="float32", **args(files))
    ds = FeatureDataset.open(out)
    ids, _, feats = read_split(ds, "val_seen")
    assert (np.diff(ids) > 0).all()  # rows keep file order
    with h5py.File(path) as f:
        np.testing.assert_array_equal(feats[:5], f["feature_map"][ids[:5]])
    assert feats.shape[1:] == (2, 2, 3) and feats[0, 1, 0, 2] == (ids[0] % 250) + 8 / 8


def _swap_label(cub):
    labels = cub.labels.copy()
    labels[cub.locs["trainval_loc"][0]] = cub.labels[cub.locs["test_unseen_loc"][0]]
    return labels


def _nan_row(cub):
    fm = features_for(np.arange(N))
    fm[7, 2] = np.nan
    return fm


BAD_HDF5 = {  # case -> (writer overrides built from the CUB source, expected message)
    "missing_key": (lambda cub: dict(drop=("labels",)), r"keys: expected all of .*missing \['labels'\]"),
    "2d_maps": (lambda cub: dict(feature_map=np.zeros((N, 4), np.float32)),
                r"feature_map: expected an N x C x H x W array, found \(11788, 4\)"),
    "short_labels": (lambda cub: dict(labels=np.zeros(N - 1, np.int64)), r"labels: expected 11788 labels"),
    "one_based": (lambda cub: dict(labels=cub.labels + 1),
                  r"labels: expected 0-based class ids in \[0, 200\).*\(labels look 1-based\)"),
    # named against att_splits.mat (the class's images in both splits), with the labels' file
    "wrong_label": (lambda cub: dict(labels=_swap_label(cub)),
                    r"att_splits.mat: test_unseen_loc: expected images of unseen classes only, i.e. of classes without "
                    r"a trainval_loc image \(by the labels of .*bad.h5\), found class 151 \(004.Groove_billed_Ani\) "
                    r"has 1 image in trainval_loc \(1-based indices \[10877\]\) and 60 in test_unseen_loc"),
    "other_split": (lambda cub: dict(trainval_loc=cub.locs["trainval_loc"] + 1),
                    r"trainval_loc: expected the images of trainval_loc in .*att_splits.mat"),
    "nan": (lambda cub: dict(feature_map=_nan_row(cub)), r"feature_map: expected finite values, found NaN/inf in rows \[7\]"),
}


@pytest.mark.parametrize("case", list(BAD_HDF5))
def test_hdf5_bad_inputs(tmp_path, files, cub, case):
    build, match = BAD_HDF5[case]
    path = write_h5(tmp_path / "bad.h5", cub, **build(cub))
    with pytest.raises(DatasetError, match=match):
        convert_hdf5(path, out=tmp_path / "ds", **args(files))
    assert not (tmp_path / "ds").exists() and list(tmp_path.iterdir()) == [path]  # nothing half-written


def test_hdf5_class_side_mismatch(tmp_path, files, cub):
    wv = tmp_path / "wv.npy"
    np.save(wv, np.ones((D - 1, 300)))
    with pytest.raises(DatasetError, match=r"wv.npy: shape: expected \(312, G\)"):
        convert_hdf5(write_h5(tmp_path / "a.h5", cub), out=tmp_path / "ds",
                     **{**args(files), "word_vectors": wv})
    with pytest.raises(DatasetError, match=r"no such file"):
        convert_hdf5(tmp_path / "missing.h5", out=tmp_path / "ds", **args(files))


def write_res101(path: Path, cub, c=3, **override):
    ids = np.arange(N)
    mat = {"features": features_for(ids, c).reshape(N, c).T.astype(np.float64),
           "labels": (cub.labels + 1)[:, None].astype(np.float64), **override}
    scipy.io.savemat(path, mat)
    return path


def test_xlsa17_res101(tmp_path, files, cub):
    path = write_res101(tmp_path / "res101.mat", cub)
    with pytest.warns(UserWarning, match="region attention degenerates"):
        out = convert_xlsa17(path, out=tmp_path / "ds", **args(files))
    ds = FeatureDataset.open(out, verify="full")
    assert ds.source == "xlsa17" and ds.feature_shape == (3, 1, 1)
    assert [ds.split(s).num_rows for s in ("trainval", "test_seen", "test_unseen")] == [7057, 1764, 2967]
    ids, labels, feats = read_split(ds, "trainval")
    np.testing.assert_array_equal(labels, cub.labels[ids])
    np.testing.assert_array_equal(feats, features_for(ids, 3))


def test_xlsa17_bad_labels(tmp_path, files, cub):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pooled-features note before an error about the inputs (issue 27)
        with pytest.raises(DatasetError, match=r"labels: expected 1-based class ids in \[1, 200\].*look 0-based"):
            convert_xlsa17(write_res101(tmp_path / "r.mat", cub, labels=cub.labels[:, None]), out=tmp_path / "ds", **args(files))
        with pytest.raises(DatasetError, match=r"keys: expected features .*missing \['features'\]"):
            convert_xlsa17(_no_features(tmp_path, cub), out=tmp_path / "ds", **args(files))


def _no_features(tmp_path, cub):
    p = tmp_path / "nofeat.mat"
    scipy.io.savemat(p, {"labels": (cub.labels + 1)[:, None]})
    return p


def test_prepare_data_cli(tmp_path, files, cub, capsys):
    h5 = write_h5(tmp_path / "cub.h5", cub)
    common = ["--att-splits", str(files / "att_splits.mat"), "--word-vectors", str(files / "CUB_attribute.pkl"),
              "--name", "CUB", "--no-progress"]
    assert prepare_data.main(["from-hdf5", "--features", str(h5), "--out", str(tmp_path / "ds"), *common]) == 0
    assert "trainval=7057" in capsys.readouterr().out
    assert prepare_data.main(["from-hdf5", "--features", str(h5), "--out", str(tmp_path / "ds"), *common]) == 2
    assert "a path that does not exist yet" in capsys.readouterr().err
    assert prepare_data.main(["synthetic", "--name", "CUB", "--out", str(tmp_path / "syn"), "--channels", "4",
                              "--height", "2", "--width", "2", "--images-per-class", "1", "--no-progress"]) == 0
    assert FeatureDataset.open(tmp_path / "syn").semi_synthetic


def test_prepare_data_on_a_full_disk_or_a_blocked_path_is_one_message_and_leaves_nothing(tmp_path):
    """Issue 12, item 7: the output cannot be written. A file in the way, and a disk that fills up
    part-way (a 256 KiB file-size limit in the process, as ENOSPC would: CPython ignores SIGXFSZ,
    so writes past it fail with EFBIG): exit 2, one line naming the output, no half-written dataset."""
    import resource
    import subprocess
    import sys

    job = Path(__file__).resolve().parents[1] / "jobs" / "prepare_data.py"
    (tmp_path / "blocker").write_text("a file, not a folder")
    args = ["--name", "CUB", "--channels", "64", "--height", "2", "--width", "2", "--images-per-class", "2",
            "--no-progress"]

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))

    for out, preexec, reason in ((tmp_path / "blocker" / "ds", None, "File exists, errno 17"),
                                 (tmp_path / "full" / "ds", limited, "File too large, errno 27")):
        p = subprocess.run([sys.executable, str(job), "synthetic", *args, "--out", str(out)], capture_output=True,
                           text=True, timeout=300, preexec_fn=preexec)
        assert p.returncode == 2, p.stderr[-2000:]
        assert p.stderr.startswith(f"error: {out}: cannot be written ({reason}"), p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        assert not out.exists()
        if out.parent.is_dir():  # nothing beside it either: no temporary folder left behind
            assert list(out.parent.iterdir()) == []
