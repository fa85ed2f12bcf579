"""Tests of dedn.data: the writer, the manifest, and every check FeatureDataset.open makes."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedn.data.class_side import ClassSide, normalize_rows
from dedn.data import (
    SCHEMA_VERSION, SPLITS, DatasetWriter, FeatureDataset, ShardInfo, sha256_file, split_classes,
    validate_class_side, validate_clusters,
)
from dedn.errors import DatasetError

FEATURE_SHAPE = (3, 2, 2)
ROWS = {"trainval": 23, "test_seen": 9, "test_unseen": 11, "train": 17, "val_seen": 5, "val_unseen": 7}
SHARD_BYTES = 200  # ~5 rows of 3x2x2 fp16 a shard, 1 row a row group: many shards and groups


def make_class_side(seed: int = 0) -> ClassSide:
    """Random class side: K=6, D=5, G=4; seen 0-3, unseen 4-5; train 0-2, val 3."""
    rng = np.random.default_rng(seed)
    raw = rng.random((6, 5)) * 100
    return ClassSide(
        name="toy",
        class_names=tuple(f"class{i}" for i in range(6)),
        attribute_names=tuple(f"attr{i}" for i in range(5)),
        attributes_raw=raw,
        attributes=normalize_rows(raw),
        word_vectors=rng.standard_normal((5, 4)).astype(np.float32),
        seen_classes=np.arange(4),
        unseen_classes=np.array([4, 5]),
        train_classes=np.arange(3),
        val_classes=np.array([3]),
        clusters={"manual": {"head": [0, 1], "body": [2, 3, 4]}, "halved": {"first": [0, 1, 2], "second": [3, 4]}},
    )


def make_rows(class_side: ClassSide, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (n,) unique per split, labels from the split's classes, features (n, 3, 2, 2) float32."""
    rng = np.random.default_rng(seed)
    ids = 1000 * SPLITS.index(split) + np.arange(n, dtype=np.int64)
    labels = rng.choice(split_classes(class_side, split), size=n)
    return ids, labels, rng.standard_normal((n, *FEATURE_SHAPE)).astype(np.float32)


def write_dataset(root: Path, class_side: ClassSide | None = None, rows: dict[str, int] = ROWS,
                  shard_bytes: int = SHARD_BYTES, **kwargs) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Write all six splits (each in two add() calls) and return what was written, per split."""
    cs = class_side or make_class_side()
    written = {}
    with DatasetWriter(root, class_side=cs, feature_shape=FEATURE_SHAPE, shard_bytes=shard_bytes, **kwargs) as w:
        for i, split in enumerate(SPLITS):
            ids, labels, feats = make_rows(cs, split, rows[split], seed=i)
            with w.split(split) as s:
                half = len(ids) // 2
                s.add(ids[:half], labels[:half], feats[:half])
                s.add(ids[half:], labels[half:], feats[half:])
            written[split] = (ids, labels, feats)
    return written


@pytest.fixture
def dataset_dir(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "ds"
    return root, write_dataset(root)


def _read_split_plain(ds: FeatureDataset, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An independent plain read: whole shards with pyarrow, concatenated in manifest order."""
    tables = [pq.read_table(ds.shard_path(s)) for s in ds.split(split).shards]
    table = pa.concat_tables(tables)
    feats = np.array(table.column("features").to_pylist(), dtype=np.float32).reshape(-1, *FEATURE_SHAPE)
    return table.column("sample_id").to_numpy(), table.column("label").to_numpy(), feats


def _edit_manifest(root: Path, edit) -> None:
    path = root / "dataset.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# --- writing and round trip ------------------------------------------------------------------
def test_round_trip(dataset_dir):
    root, written = dataset_dir
    ds = FeatureDataset.open(root, verify="full")
    for split in SPLITS:
        ids, labels, feats = _read_split_plain(ds, split)
        w_ids, w_labels, w_feats = written[split]
        np.testing.assert_array_equal(ids, w_ids)
        np.testing.assert_array_equal(labels, w_labels)
        np.testing.assert_array_equal(feats, w_feats.astype(np.float16).astype(np.float32))  # exact fp16 values
        np.testing.assert_allclose(feats, w_feats, rtol=1e-3, atol=1e-3)  # fp16 rounding of the originals


def test_float32_storage_is_exact(tmp_path):
    written = write_dataset(tmp_path / "ds", storage_dtype="float32", shard_bytes=400)
    ds = FeatureDataset.open(tmp_path / "ds")
    assert ds.storage_dtype == "float32"
    np.testing.assert_array_equal(_read_split_plain(ds, "train")[2], written["train"][2])


def test_manifest_content(dataset_dir):
    root, _ = dataset_dir
    manifest = json.loads((root / "dataset.json").read_text())
    cs = make_class_side()
    assert manifest["schema_version"] == SCHEMA_VERSION == 1
    assert manifest["name"] == "toy" and manifest["source"] == "synthetic" and manifest["semi_synthetic"] is False
    assert manifest["feature_shape"] == [3, 2, 2] and manifest["storage_dtype"] == "float16"
    assert manifest["class_names"] == list(cs.class_names) and manifest["attribute_names"] == list(cs.attribute_names)
    assert manifest["seen_classes"] == [0, 1, 2, 3] and manifest["unseen_classes"] == [4, 5]
    assert manifest["train_classes"] == [0, 1, 2] and manifest["val_classes"] == [3]
    assert manifest["clusters"] == cs.clusters
    assert manifest["class_side"] == {"file": "class_side.npz", "sha256": sha256_file(root / "class_side.npz")}
    assert isinstance(manifest["created_by"], str) and manifest["created_by"]
    assert set(manifest["splits"]) == set(SPLITS)
    for split, n in ROWS.items():
        entry = manifest["splits"][split]
        assert entry["num_rows"] == n == sum(s["num_rows"] for s in entry["shards"])
        assert len(entry["shards"]) == -(-n // 5)  # 5 rows a shard at SHARD_BYTES
        for i, shard in enumerate(entry["shards"]):
            assert shard["file"] == f"shards/{split}-{i:05d}.parquet"
            assert shard["sha256"] == sha256_file(root / shard["file"])
    with np.load(root / "class_side.npz", allow_pickle=False) as npz:
        assert set(npz.files) == {"attributes_raw", "attributes", "word_vectors"}
        np.testing.assert_array_equal(npz["attributes"], cs.attributes)
        np.testing.assert_array_equal(npz["word_vectors"], cs.word_vectors)
    assert not list(root.rglob("*.tmp"))


def test_shards_have_several_row_groups(tmp_path):
    write_dataset(tmp_path / "ds", shard_bytes=1000)  # row groups of 250 B = 6 rows, shards of 4 groups
    ds = FeatureDataset.open(tmp_path / "ds")
    md = pq.ParquetFile(ds.shard_path(ds.split("trainval").shards[0])).metadata
    assert md.num_row_groups == 4 and md.row_group(0).num_rows == 6


def test_open_attributes(dataset_dir):
    root, _ = dataset_dir
    ds = FeatureDataset.open(root)
    cs = make_class_side()
    assert ds.root == root and ds.name == "toy" and ds.feature_shape == (3, 2, 2) and ds.source == "synthetic"
    np.testing.assert_array_equal(ds.class_side.attributes_raw, cs.attributes_raw)
    np.testing.assert_array_equal(ds.class_side.unseen_classes, [4, 5])
    assert ds.class_side.class_names == cs.class_names and ds.class_side.clusters == cs.clusters
    info = ds.split("val_unseen")
    assert info.num_rows == 7 and isinstance(info.shards[0], ShardInfo)
    assert ds.shard_path(info.shards[0]) == root / "shards" / "val_unseen-00000.parquet"
    with pytest.raises(DatasetError, match="splits: expected one of"):
        ds.split("validation")


def test_split_classes_table():
    cs = make_class_side()
    expected = {"trainval": [0, 1, 2, 3], "test_seen": [0, 1, 2, 3], "test_unseen": [4, 5],
                "train": [0, 1, 2], "val_seen": [0, 1, 2], "val_unseen": [3]}
    for split, classes in expected.items():
        assert split_classes(cs, split).tolist() == classes


# --- atomicity ---------------------------------------------------------------------------------
def test_exception_leaves_nothing(tmp_path):
    cs = make_class_side()
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(tmp_path / "ds", class_side=cs, feature_shape=FEATURE_SHAPE, shard_bytes=SHARD_BYTES) as w:
            with w.split("trainval") as s:
                s.add(*make_rows(cs, "trainval", 12, seed=0))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_missing_split_is_an_error_and_leaves_nothing(tmp_path):
    cs = make_class_side()
    with pytest.raises(DatasetError, match=r"splits: expected all of .*missing \['val_seen', 'val_unseen'\]"):
        with DatasetWriter(tmp_path / "ds", class_side=cs, feature_shape=FEATURE_SHAPE) as w:
            for split in SPLITS[:4]:
                with w.split(split) as s:
                    s.add(*make_rows(cs, split, 3, seed=0))
    assert list(tmp_path.iterdir()) == []


def test_existing_root_and_overwrite(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root)
    with pytest.raises(DatasetError, match="root: expected a path that does not exist"):
        write_dataset(root)
    old_sha = sha256_file(root / "dataset.json")
    # A failed overwrite keeps the old dataset intact.
    with pytest.raises(DatasetError, match="splits"):
        with DatasetWriter(root, class_side=make_class_side(), feature_shape=FEATURE_SHAPE, overwrite=True):
            pass
    assert sha256_file(root / "dataset.json") == old_sha
    written = write_dataset(root, rows={**ROWS, "train": 4}, overwrite=True)
    ds = FeatureDataset.open(root, verify="full")
    assert ds.split("train").num_rows == 4
    np.testing.assert_array_equal(_read_split_plain(ds, "train")[0], written["train"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_split_written_twice_and_unknown_split(tmp_path):
    with DatasetWriter(tmp_path / "ds", class_side=make_class_side(), feature_shape=FEATURE_SHAPE) as w:
        w.split("train")
        with pytest.raises(DatasetError, match="splits.train: expected each split written once"):
            w.split("train")
        with pytest.raises(DatasetError, match="split: expected one of"):
            w.split("validation")
        w.abort()
    assert list(tmp_path.iterdir()) == []


# --- bad rows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,change,match", [
    ("train", lambda i, y, x: (i, y, x[:, :2]), r"\(split train\): features: expected shape \(4, 3, 2, 2\), found \(4, 2, 2, 2\)"),
    ("train", lambda i, y, x: (i, y[:3], x), r"labels: expected a 1-D integer array of 4 labels"),
    ("train", lambda i, y, x: (i, y.astype(float), x), r"labels: expected a 1-D integer array"),
    ("train", lambda i, y, x: (i, y, np.where(np.arange(4)[:, None, None, None] == 2, np.nan, x)), r"features: expected finite values, found 12 NaN/inf"),
    ("train", lambda i, y, x: (i, y, np.full_like(x, np.inf)), r"features: expected finite values"),
    ("train", lambda i, y, x: (i, y, x * 1e6), r"features: expected values representable in float16"),
    ("train", lambda i, y, x: (i, np.array([0, 1, 6, -1]), x), r"labels: expected class ids in \[0, 6\), found \[6, -1\]"),
    ("trainval", lambda i, y, x: (i, np.array([0, 1, 4, 2]), x), r"\(split trainval\): labels: expected classes of seen_classes only, found other classes \[4\]"),
    ("test_unseen", lambda i, y, x: (i, np.array([4, 5, 0, 4]), x), r"labels: expected classes of unseen_classes only, found other classes \[0\]"),
    ("train", lambda i, y, x: (i, np.array([0, 1, 3, 2]), x), r"labels: expected classes of train_classes only, found other classes \[3\]"),
    ("val_unseen", lambda i, y, x: (i, np.array([3, 3, 1, 3]), x), r"labels: expected classes of val_classes only"),
])
def test_add_rejects_bad_rows(tmp_path, split, change, match):
    cs = make_class_side()
    ids, labels, feats = make_rows(cs, split, 4, seed=0)
    with DatasetWriter(tmp_path / "ds", class_side=cs, feature_shape=FEATURE_SHAPE) as w:
        s = w.split(split)
        with pytest.raises(DatasetError, match=match):
            s.add(*change(ids, labels, feats))
        w.abort()


def test_duplicate_sample_ids(tmp_path):
    cs = make_class_side()
    ids, labels, feats = make_rows(cs, "train", 4, seed=0)
    with pytest.raises(DatasetError, match=r"sample_ids: expected unique ids within a split, found repeated ids \[3000\]"):
        with DatasetWriter(tmp_path / "ds", class_side=cs, feature_shape=FEATURE_SHAPE) as w:
            with w.split("train") as s:
                s.add(ids, labels, feats)
                s.add(ids[:1], labels[:1], feats[:1])
    assert list(tmp_path.iterdir()) == []


# --- bad class side --------------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (dict(attributes=np.ones((6, 4), np.float32)), r"attributes: expected shape \(K=6, D=5\).*found \(6, 4\)"),
    (dict(attributes_raw=np.ones((5, 5))), r"attributes_raw: expected shape \(K=6, D=5\).*found \(5, 5\)"),
    (dict(word_vectors=np.ones((4, 4), np.float32)), r"word_vectors: expected shape \(D=5, G\).*found \(4, 4\)"),
    (dict(class_names=tuple("abcde")), r"attributes_raw: expected shape \(K=5, D=5\)"),
    (dict(attribute_names=tuple("abcdef")), r"expected shape \(K=6, D=6\)"),
    (dict(attributes=np.full((6, 5), np.nan, np.float32)), r"attributes: expected finite values, found 30 NaN/inf"),
    (dict(word_vectors=np.full((5, 4), np.inf, np.float32)), r"word_vectors: expected finite values"),
    (dict(unseen_classes=np.array([3, 4, 5])), r"unseen_classes: expected classes disjoint from seen_classes"),
    (dict(seen_classes=np.arange(7)), r"seen_classes: expected class ids in \[0, 6\), found \[6\]"),
    (dict(val_classes=np.array([4])), r"val_classes: expected a subset of seen_classes"),
    (dict(val_classes=np.array([2, 3])), r"val_classes: expected classes disjoint from train_classes"),
    (dict(clusters={"manual": {"a": [0, 1, 2], "b": [2, 3, 4]}}), r"clusters.manual: expected disjoint clusters, found attribute 2 in both 'a' and 'b'"),
    (dict(clusters={"halved": {"a": [0, 1], "b": [3, 4]}}), r"clusters.halved: expected clusters covering all 5 attributes, found attributes in no cluster: \[2\]"),
    (dict(clusters={"halved": {"a": [0, 1, 2], "b": [3, 4, 5]}}), r"clusters.halved.b: expected attribute ids in \[0, 5\), found 5"),
])
def test_writer_rejects_bad_class_side(tmp_path, change, match):
    cs = dataclasses.replace(make_class_side(), **change)
    with pytest.raises(DatasetError, match=match):
        DatasetWriter(tmp_path / "ds", class_side=cs, feature_shape=FEATURE_SHAPE)
    assert list(tmp_path.iterdir()) == []


def test_validate_clusters_direct():
    validate_clusters({"a": [1, 0], "b": [2]}, 3, "where")
    with pytest.raises(DatasetError, match=r"^where: clusters: expected a non-empty"):
        validate_clusters({}, 3, "where")
    with pytest.raises(DatasetError, match=r"^f.npz: clusters.x: expected a non-empty list"):
        validate_clusters({"x": []}, 3, "f.npz")
    validate_class_side(make_class_side(), "ok")


# --- bad files on open -------------------------------------------------------------------------------
def test_missing_and_unparseable_manifest(dataset_dir):
    root, _ = dataset_dir
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset.json: file: expected valid JSON, found JSONDecodeError"):
        FeatureDataset.open(root)
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"dataset.json: file: expected a dataset manifest"):
        FeatureDataset.open(root)


def test_unsupported_schema_version(dataset_dir):
    root, _ = dataset_dir
    _edit_manifest(root, lambda m: m.update(schema_version=2))
    with pytest.raises(DatasetError, match=r"dataset.json: schema_version: expected 1, found 2"):
        FeatureDataset.open(root)


def test_missing_manifest_key(dataset_dir):
    root, _ = dataset_dir
    _edit_manifest(root, lambda m: m.pop("val_classes"))
    with pytest.raises(DatasetError, match=r"dataset.json: keys: .*missing \['val_classes'\]"):
        FeatureDataset.open(root)


def test_manifest_names_disagree_with_arrays(dataset_dir):
    root, _ = dataset_dir
    _edit_manifest(root, lambda m: m["attribute_names"].append("extra"))
    with pytest.raises(DatasetError, match=r"class_side.npz \+ dataset.json: attributes_raw: expected shape \(K=6, D=6\)"):
        FeatureDataset.open(root)


def test_manifest_clusters_overlap(dataset_dir):
    root, _ = dataset_dir
    _edit_manifest(root, lambda m: m["clusters"]["manual"]["head"].append(2))
    with pytest.raises(DatasetError, match=r"dataset.json: clusters.manual: expected disjoint clusters"):
        FeatureDataset.open(root)


def test_manifest_wrong_split_side(dataset_dir):
    root, _ = dataset_dir
    _edit_manifest(root, lambda m: m.update(train_classes=[0, 1, 2, 5]))
    with pytest.raises(DatasetError, match=r"train_classes: expected a subset of seen_classes"):
        FeatureDataset.open(root)


def _resave_class_side(root: Path, **arrays) -> None:
    path = root / "class_side.npz"
    with np.load(path) as npz:
        data = {k: npz[k] for k in npz.files}
    data.update(arrays)
    with open(path, "wb") as f:
        np.savez(f, **data)
    _edit_manifest(root, lambda m: m["class_side"].update(sha256=sha256_file(path)))


def test_class_side_file_checks(dataset_dir):
    root, _ = dataset_dir
    (root / "class_side.npz").write_bytes((root / "class_side.npz").read_bytes() + b"x")
    with pytest.raises(DatasetError, match=r"class_side.npz: sha256: expected [0-9a-f]{64} \(dataset.json\)"):
        FeatureDataset.open(root, verify="none")
    _resave_class_side(root, word_vectors=np.ones((4, 4), np.float32))
    with pytest.raises(DatasetError, match=r"class_side.npz \+ dataset.json: word_vectors: expected shape \(D=5, G\)"):
        FeatureDataset.open(root)
    _resave_class_side(root, word_vectors=np.ones((5, 4), np.float32), attributes=np.full((6, 5), np.nan, np.float32))
    with pytest.raises(DatasetError, match=r"attributes: expected finite values, found 30 NaN/inf"):
        FeatureDataset.open(root)


def test_shard_row_count_mismatch(dataset_dir):
    root, _ = dataset_dir

    def edit(m):
        m["splits"]["train"]["shards"][1]["num_rows"] += 1
        m["splits"]["train"]["num_rows"] += 1
    _edit_manifest(root, edit)
    with pytest.raises(DatasetError, match=r"train-00001.parquet: num_rows: expected 6 \(dataset.json\), found 5"):
        FeatureDataset.open(root)
    FeatureDataset.open(root, verify="none")  # "none" trusts the manifest


def test_split_total_disagrees_with_shards(dataset_dir):
    root, _ = dataset_dir
    _edit_manifest(root, lambda m: m["splits"]["val_seen"].update(num_rows=99))
    with pytest.raises(DatasetError, match=r"splits.val_seen.num_rows: expected the sum of its shards' rows \(5\), found 99"):
        FeatureDataset.open(root, verify="none")


def test_shard_checksum_mismatch(dataset_dir):
    root, _ = dataset_dir
    _edit_manifest(root, lambda m: m["splits"]["test_seen"]["shards"][0].update(sha256="0" * 64))
    FeatureDataset.open(root, verify="rows")  # footers still agree
    with pytest.raises(DatasetError, match=r"test_seen-00000.parquet: sha256: expected 0{64} \(dataset.json\)"):
        FeatureDataset.open(root, verify="full")


def test_missing_shard(dataset_dir):
    root, _ = dataset_dir
    (root / "shards" / "val_unseen-00001.parquet").unlink()
    with pytest.raises(DatasetError, match=r"val_unseen-00001.parquet: file: expected a shard of split val_unseen"):
        FeatureDataset.open(root)


def _rewrite_shard(root: Path, split: str, index: int, table: pa.Table) -> None:
    """Replace one shard and update its checksum, so only the content check can catch it."""
    name = f"shards/{split}-{index:05d}.parquet"
    pq.write_table(table, root / name)

    def edit(m):
        for s in m["splits"][split]["shards"]:
            if s["file"] == name:
                s["sha256"], s["bytes"] = sha256_file(root / name), (root / name).stat().st_size
    _edit_manifest(root, edit)


def test_shard_with_wrong_list_size(dataset_dir):
    root, _ = dataset_dir
    path = root / "shards" / "train-00000.parquet"
    t = pq.read_table(path)
    values = pa.array(np.zeros(t.num_rows * 11, np.float16))
    bad = t.set_column(2, "features", pa.FixedSizeListArray.from_arrays(values, 11))
    _rewrite_shard(root, "train", 0, bad)
    with pytest.raises(DatasetError, match=r"train-00000.parquet: schema: expected .*\[12\].*found .*\[11\]"):
        FeatureDataset.open(root)


def test_shard_with_wrong_columns(dataset_dir):
    root, _ = dataset_dir
    t = pq.read_table(root / "shards" / "train-00000.parquet")
    _rewrite_shard(root, "train", 0, t.rename_columns(["id", "label", "features"]))
    with pytest.raises(DatasetError, match=r"train-00000.parquet: schema: expected sample_id: int64"):
        FeatureDataset.open(root)


def test_shard_with_labels_of_the_wrong_side(dataset_dir):
    root, _ = dataset_dir
    t = pq.read_table(root / "shards" / "trainval-00000.parquet")
    labels = pa.array(np.array([0, 1, 5, 2, 3], np.int32))  # 5 is unseen
    _rewrite_shard(root, "trainval", 0, t.set_column(1, pa.field("label", pa.int32(), nullable=False), labels))
    # "rows" reads the label column (a few KiB) besides the footers; "full" every row
    for verify in ("rows", "full"):
        with pytest.raises(DatasetError, match=r"trainval-00000.parquet: label: expected classes of seen_classes "
                                               r"\(split trainval, dataset.json\), found other classes \[5\]"):
            FeatureDataset.open(root, verify=verify)
    from dedn.data.reader import ShardReader  # the reader checks labels as it streams

    reader = ShardReader(FeatureDataset.open(root, verify="none"), "trainval", batch_size=4, shuffle=False)
    with pytest.raises(DatasetError, match=r"trainval-00000.parquet: label: expected classes of split trainval"):
        list(reader)


def test_verify_mode_is_checked(dataset_dir):
    root, _ = dataset_dir
    with pytest.raises(DatasetError, match=r"verify: expected one of \['none', 'rows', 'full'\], found 'all'"):
        FeatureDataset.open(root, verify="all")


def test_open_checks_only_the_named_splits(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset.root, root)
    ds = FeatureDataset.open(root)
    shard = root / ds.split("test_unseen").shards[0].file
    shard.write_bytes(b"not parquet")  # a broken test shard
    with pytest.raises(DatasetError, match="test_unseen"):
        FeatureDataset.open(root)
    opened = FeatureDataset.open(root, splits=("train", "val_seen", "val_unseen"))  # a sweep's view
    assert opened.split("train").num_rows == ds.split("train").num_rows
