"""Corrupt shards are caught with a DatasetError naming the file (issue 12, point 4).

Bytes flipped in a shard, a damaged page header, a cut-out middle or a truncated end, a shard
listed twice in dataset.json, and NaN/inf features in a shard whose checksum is right.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dedn.data.format as dataset_mod  # where check_shard_sha256 finds sha256_file
from dedn.data import SPLITS, DatasetWriter, FeatureDataset, nonfinite_rows, sha256_file, split_classes
from dedn.errors import DatasetError
from dedn.data.loader import ShardIterableDataset
from dedn.data.reader import ShardReader
from toydata import TOY_SHAPE, toy_class_side

FEATURE_SIZE = int(np.prod(TOY_SHAPE))


def _write(root: Path, storage_dtype: str = "float16") -> Path:
    """Toy class side, 8 rows a class; trainval (48 rows) = 2 shards of 4 row groups of 6 rows."""
    cs = toy_class_side()
    rng = np.random.default_rng(3)
    shard_bytes = 4000 if storage_dtype == "float16" else 8000
    with DatasetWriter(root, class_side=cs, feature_shape=TOY_SHAPE, storage_dtype=storage_dtype,
                       shard_bytes=shard_bytes) as w:
        for i, split in enumerate(SPLITS):
            labels = np.repeat(split_classes(cs, split), 8)
            ids = 1000 * i + np.arange(labels.size, dtype=np.int64)
            with w.split(split) as s:
                s.add(ids, labels, rng.standard_normal((labels.size, *TOY_SHAPE)).astype(np.float32))
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return _write(tmp_path / "ds")


def _manifest(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _save_manifest(root: Path, manifest: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(manifest))


def _rehash(root: Path, name: str) -> str:
    """Record the shard's current sha256 in dataset.json (a shard that was damaged before it was hashed)."""
    m = _manifest(root)
    for split in m["splits"].values():
        for s in split["shards"]:
            if s["file"] == name:
                s["sha256"], s["bytes"] = sha256_file(root / name), (root / name).stat().st_size
    _save_manifest(root, m)
    return sha256_file(root / name)


def _features_chunk(path: Path, row_group: int) -> tuple[int, int]:
    """(file offset, byte size) of the features column chunk of one row group."""
    col = pq.ParquetFile(path).metadata.row_group(row_group).column(2)
    return col.data_page_offset, col.total_compressed_size


def _read_all(ds: FeatureDataset, split: str = "trainval", **kw) -> list:
    return list(ShardReader(ds, split, batch_size=5, shuffle=False, **kw))


NAME = "shards/trainval-00000.parquet"


def test_healthy_dataset_passes_every_check(root):
    ds = FeatureDataset.open(root, verify="full")
    for split in SPLITS:
        assert sum(b.features.shape[0] for b in _read_all(ds, split)) == ds.split(split).num_rows
        assert all(bool(b.features.isfinite().all()) for b in _read_all(ds, split))
    assert len(ds.split("trainval").shards) == 2
    assert pq.ParquetFile(root / NAME).metadata.num_row_groups == 4


def test_checksums_do_not_change_the_batches(root):
    ds = FeatureDataset.open(root)
    for kw in ({"shuffle": False}, {"shuffle": True, "seed": 5, "buffer_rows": 7, "class_balanced": True}):
        on = list(ShardReader(ds, "trainval", batch_size=4, verify_checksums=True, **kw))
        off = list(ShardReader(ds, "trainval", batch_size=4, verify_checksums=False, **kw))
        assert len(on) == len(off)
        for a, b in zip(on, off):
            assert a.sample_ids.equal(b.sample_ids) and a.labels.equal(b.labels)
            assert a.features.numpy().tobytes() == b.features.numpy().tobytes()


def test_each_shard_is_hashed_once_per_reader(root, monkeypatch):
    ds = FeatureDataset.open(root)
    hashed: list[str] = []
    original = dataset_mod.sha256_file

    def counting(path, *a, **kw):
        hashed.append(Path(path).name)
        return original(path, *a, **kw)
    monkeypatch.setattr(dataset_mod, "sha256_file", counting)
    reader = ShardReader(ds, "trainval", batch_size=4, seed=1)
    for epoch in range(3):
        reader.set_epoch(epoch)
        list(reader)
    assert sorted(hashed) == ["trainval-00000.parquet", "trainval-00001.parquet"]
    # A reader for DataLoader worker processes hashes up front, before they fork.
    hashed.clear()
    ShardIterableDataset(ShardReader(ds, "trainval", batch_size=4), num_workers=2)
    assert sorted(hashed) == ["trainval-00000.parquet", "trainval-00001.parquet"]
    hashed.clear()
    list(ShardReader(ds, "trainval", batch_size=4, verify_checksums=False))
    assert hashed == []


# --- bytes flipped in the middle of a shard --------------------------------------------------
def _flip_middle(root: Path) -> None:
    """Overwrite 8 bytes in the middle of the features of row group 1 with 0xFF (float16 NaN)."""
    path = root / NAME
    offset, size = _features_chunk(path, 1)
    data = bytearray(path.read_bytes())
    middle = offset + size // 2
    data[middle:middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def test_flipped_bytes_give_a_checksum_error_not_nan_features(root):
    expected = _manifest(root)["splits"]["trainval"]["shards"][0]["sha256"]
    _flip_middle(root)
    found = sha256_file(root / NAME)
    ds = FeatureDataset.open(root)  # footers are intact
    message = rf"{re.escape(str(root / NAME))}: sha256: expected {expected} \(dataset.json\), found {found}"
    with pytest.raises(DatasetError, match=message) as info:
        _read_all(ds)
    assert (info.value.file, info.value.field) == (str(root / NAME), "sha256")
    for kw in ({"shuffle": True}, {"shuffle": True, "class_balanced": True}):  # training reads too
        with pytest.raises(DatasetError, match=message):
            list(ShardReader(ds, "trainval", batch_size=4, **kw))
    with pytest.raises(DatasetError, match=message):
        FeatureDataset.open(root, verify="full")


def test_flipped_bytes_without_checksums_are_caught_as_nan_rows(root):
    _flip_middle(root)
    table = pq.read_table(root / NAME)
    feats = np.asarray(table.column("features").combine_chunks().flatten()).reshape(-1, FEATURE_SIZE)
    row = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
    sid = int(table.column("sample_id")[row].as_py())
    assert 6 <= row < 12  # in row group 1
    with pytest.raises(DatasetError, match=rf"{re.escape(str(root / NAME))}: features: expected finite values "
                                           rf"\(no NaN/inf\), found NaN/inf in row {row} \(sample_id {sid}\)"):
        _read_all(FeatureDataset.open(root), verify_checksums=False)


# --- damaged structure: Arrow errors wrapped with the path -----------------------------------
def _damage_page_header(path: Path) -> None:
    offset, _ = _features_chunk(path, 1)
    data = bytearray(path.read_bytes())
    data[offset:offset + 12] = b"\xde\xad\xbe\xef" * 3
    path.write_bytes(bytes(data))


def _cut_middle(path: Path) -> None:
    offset, size = _features_chunk(path, 1)
    data = path.read_bytes()
    path.write_bytes(data[:offset + 5] + data[offset + 5 + size // 2:])


@pytest.mark.parametrize("damage", [_damage_page_header, _cut_middle])
def test_damaged_shard_gives_a_dataset_error_with_the_path(root, damage):
    damage(root / NAME)
    # a cut changes the size, named when the dataset is opened; same-size damage by the checksum on read
    field = "bytes" if damage is _cut_middle else "sha256"
    with pytest.raises(DatasetError, match=re.escape(str(root / NAME)) + f": {field}"):
        _read_all(FeatureDataset.open(root))
    # The same damage in a shard whose checksum was taken after it (so only decoding can see it).
    _rehash(root, NAME)
    try:  # "rows" reads the label column too: damage there is named when the dataset is opened
        ds = FeatureDataset.open(root)
    except DatasetError as e:
        assert str(e).startswith(f"{root / NAME}: label: expected a readable label column"), e
        ds = FeatureDataset.open(root, verify="none")
    with pytest.raises(DatasetError, match=re.escape(str(root / NAME)) + r": row group 1: expected a readable "
                                           r"Parquet row group, found (OSError|ArrowInvalid|ArrowException)") as info:
        _read_all(ds)
    assert not isinstance(info.value, OSError)
    with pytest.raises(DatasetError, match=re.escape(str(root / NAME)) + ": row group 1"):
        FeatureDataset.open(root, verify="full")
    pickle.loads(pickle.dumps(info.value))  # it reaches a driver from a worker intact


def test_truncated_shard_gives_a_dataset_error_with_the_path(root):
    path = root / NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _rehash(root, NAME)
    ds = FeatureDataset.open(root, verify="none")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ": file: expected a Parquet file, found ArrowInvalid"):
        ShardReader(ds, "trainval", batch_size=4)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ": file: expected a Parquet file"):
        FeatureDataset.open(root)


# --- a shard listed twice in dataset.json ----------------------------------------------------
def test_shard_listed_twice_in_a_split_is_rejected(root):
    m = _manifest(root)
    split = m["splits"]["trainval"]
    split["shards"].append(dict(split["shards"][0]))
    split["num_rows"] += split["shards"][0]["num_rows"]
    _save_manifest(root, m)
    with pytest.raises(DatasetError, match=re.escape(str(root / "dataset.json")) + r": splits.trainval.shards: "
                                           r"expected each shard file listed once, found shards/trainval-00000.parquet "
                                           r"listed twice in this split"):
        FeatureDataset.open(root, verify="none")


def test_shard_listed_in_two_splits_is_rejected(root):
    m = _manifest(root)
    shard = dict(m["splits"]["test_seen"]["shards"][0])
    shard["file"] = "shards/../shards/" + shard["file"].split("/")[-1]  # the same file, spelt differently
    m["splits"]["val_seen"]["shards"].append(shard)
    m["splits"]["val_seen"]["num_rows"] += shard["num_rows"]
    _save_manifest(root, m)
    with pytest.raises(DatasetError, match=r"splits.val_seen.shards: expected each shard file listed once, "
                                           r"found shards/../shards/test_seen-00000.parquet listed also in splits.test_seen"):
        FeatureDataset.open(root, verify="none")


# --- NaN / inf features in a shard whose checksum is right -----------------------------------
def _poison(root: Path, name: str, rows: dict[int, float]) -> list[int]:
    """Rewrite shard `name` with value v at feature 5 of each row r (rows within the shard); returns sample ids."""
    path = root / name
    pf = pq.ParquetFile(path)
    table = pf.read()
    dtype = table.schema.field("features").type.value_type.to_pandas_dtype()
    feats = np.asarray(table.column("features").combine_chunks().flatten()).reshape(-1, FEATURE_SIZE).copy()
    for r, v in rows.items():
        feats[r, 5] = v
    per_group = pf.metadata.row_group(0).num_rows
    field = table.schema.field("features")
    new = table.set_column(2, field, pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel().astype(dtype)),
                                                                       type=field.type))
    pq.write_table(new, path, row_group_size=per_group, compression="none", use_dictionary=False)
    _rehash(root, name)
    return [int(table.column("sample_id")[r].as_py()) for r in rows]


@pytest.mark.parametrize("storage_dtype", ["float16", "float32"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_rejected_with_shard_and_row(tmp_path, storage_dtype, value):
    root = _write(tmp_path / "ds", storage_dtype)
    name = "shards/trainval-00001.parquet"
    (sid,) = _poison(root, name, {9: value})
    ds = FeatureDataset.open(root)  # the checksum is right
    message = (rf"{re.escape(str(root / name))}: features: expected finite values \(no NaN/inf\), "
               rf"found NaN/inf in row 9 \(sample_id {sid}\)")
    with pytest.raises(DatasetError, match=message):  # an evaluation or prediction read
        _read_all(ds)
    for kw in ({"seed": 3}, {"seed": 4, "class_balanced": True, "drop_last": True}):  # training reads
        with pytest.raises(DatasetError, match=message):
            list(ShardReader(ds, "trainval", batch_size=4, shuffle=True, **kw))
    with pytest.raises(DatasetError, match=message):
        FeatureDataset.open(root, verify="full")


def test_several_non_finite_rows_name_the_first(root):
    name = "shards/trainval-00000.parquet"
    sids = _poison(root, name, {13: np.nan, 14: np.inf, 16: np.nan})
    with pytest.raises(DatasetError, match=rf"row 13 \(sample_id {sids[0]}\) and 2 more rows of this read"):
        _read_all(FeatureDataset.open(root))


def test_nonfinite_rows():
    x = np.zeros((7, 4), np.float16)
    x[1, 0] = np.nan
    x[3, 3] = np.inf
    x[4, 2] = -np.inf
    x[5] = [65504, -65504, np.float16(6e-8), -0.0]  # largest finite, a subnormal, negative zero
    assert nonfinite_rows(x).tolist() == [1, 3, 4]
    assert nonfinite_rows(x.astype(np.float32)).tolist() == [1, 3, 4]
    assert nonfinite_rows(x[5:]).tolist() == []
    assert nonfinite_rows(np.zeros((0, 4), np.float16)).tolist() == []
