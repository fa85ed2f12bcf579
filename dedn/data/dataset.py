"""Opening a feature dataset: `FeatureDataset.open` reads and checks a directory (manifest, class
side, shard footers, optionally every row and checksum; a sweep opens only the selection splits)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn.data.class_side import ClassSide
from dedn.errors import DatasetError
from dedn.storage import is_uri
from dedn.data.format import (
    SCHEMA_VERSION, SPLITS, SOURCES, STORAGE_DTYPES, VERIFY_MODES, MANIFEST_FILE, CLASS_SIDE_ARRAYS, COLUMNS,
    _REQUIRED_KEYS, _SPLIT_SIDE, DISJOINT_SPLITS, ShardInfo, SplitInfo, split_classes, sha256_file, check_shard_sha256,
    arrow_error, check_finite_features, _brief, validate_class_side, check_shard_schema, shared_ids,
)


class FeatureDataset:
    """A dataset directory opened for reading; shards are read by `dedn.data.reader.ShardReader`."""

    def __init__(self, root: Path, manifest: dict[str, Any], class_side: ClassSide, splits: dict[str, SplitInfo]):
        self.root = root  # the directory read here (for an object-store dataset, this node's staged copy)
        self.location = str(root)  # where it was opened from: a path, or the object-store URI
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.source: str = manifest["source"]
        self.semi_synthetic: bool = bool(manifest["semi_synthetic"])
        self.feature_shape: tuple[int, int, int] = tuple(manifest["feature_shape"])  # type: ignore[assignment]
        self.storage_dtype: str = manifest["storage_dtype"]
        self.class_side = class_side
        self.splits = splits

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}={i.num_rows}" for s, i in self.splits.items())
        return f"FeatureDataset({str(self.root)!r}, name={self.name!r}, feature_shape={self.feature_shape}, {rows})"

    @property
    def feature_size(self) -> int:
        c, h, w = self.feature_shape
        return c * h * w

    def split(self, name: str) -> SplitInfo:
        """The SplitInfo of `name`; DatasetError for an unknown split."""
        if name not in self.splits:
            raise DatasetError(self.root / MANIFEST_FILE, "splits", f"one of {list(self.splits)}", repr(name))
        return self.splits[name]

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.root / shard.file

    @classmethod
    def open(cls, root: str | os.PathLike[str], verify: str = "rows", splits: Iterable[str] | None = None
             ) -> "FeatureDataset":
        """Open and check a dataset directory.

        verify: "none" trusts the manifest; "rows" also checks every shard exists, has the
        manifest's row count and the expected columns (Parquet footers only); "full" also checks
        every sha256 and that every feature is finite. Both "rows" and "full" check that every label
        belongs to its split's classes and that no two splits of DISJOINT_SPLITS share a sample_id
        (the label and sample_id columns: a few KiB a shard, seconds for any xlsa17 dataset).
        `splits` limits the shard checks to those splits (a sweep never opens the test shards, so
        their overlap with trainval is checked by the final run's open). Whatever the mode, an
        empty split and a shard file listed twice in dataset.json are refused, and a ShardReader
        checks each shard's sha256 before its first read and the features it decodes.

        `root` may be an object-store URI (`s3://bucket/dataset`): the dataset is then staged on this
        node first, verified, once per node and version (`dedn.data.remote`), and `root` becomes the copy.
        """
        location = str(root)
        if is_uri(root):
            from dedn.data.remote import stage  # pyarrow's S3 filesystem: on use

            root = stage(str(root))
        root = Path(root)
        if verify not in VERIFY_MODES:
            raise DatasetError(root, "verify", f"one of {list(VERIFY_MODES)}", repr(verify))
        mpath = root / MANIFEST_FILE
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise DatasetError(mpath, "file", "a dataset manifest (write one with DatasetWriter)", "no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(mpath, "file", "valid JSON", f"{type(e).__name__}: {e}") from None
        if not isinstance(manifest, dict):
            raise DatasetError(mpath, "file", "a JSON object", type(manifest).__name__)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(mpath, "schema_version", str(SCHEMA_VERSION), repr(manifest.get("schema_version")))
        missing = [k for k in _REQUIRED_KEYS if k not in manifest]
        if missing:
            raise DatasetError(mpath, "keys", f"all of {list(_REQUIRED_KEYS)}", f"missing {missing}")
        shape = manifest["feature_shape"]
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
            raise DatasetError(mpath, "feature_shape", "[C, H, W] of positive ints", repr(shape))
        if manifest["storage_dtype"] not in STORAGE_DTYPES:
            raise DatasetError(mpath, "storage_dtype", f"one of {list(STORAGE_DTYPES)}", repr(manifest["storage_dtype"]))
        if manifest["source"] not in SOURCES:
            raise DatasetError(mpath, "source", f"one of {list(SOURCES)}", repr(manifest["source"]))
        class_side = _load_class_side(root, mpath, manifest)
        parsed = _parse_splits(mpath, manifest)
        ds = cls(root, manifest, class_side, parsed)
        ds.location = location if is_uri(location) else str(root)  # what other nodes open: the URI, not this node's copy
        if verify != "none":
            ids = {}
            for info in (parsed.values() if splits is None else [ds.split(s) for s in splits]):
                ids[info.name] = np.concatenate([np.zeros(0, np.int64)] + [
                    _verify_shard(ds, info.name, shard, full=verify == "full") for shard in info.shards])
            check_disjoint_splits(mpath, ids)
        return ds


def _load_class_side(root: Path, mpath: Path, manifest: dict[str, Any]) -> ClassSide:
    entry = manifest["class_side"]
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise DatasetError(mpath, "class_side", '{"file": ..., "sha256": ...}', repr(entry)[:80])
    path = root / entry["file"]
    if not path.is_file():
        raise DatasetError(path, "file", "the class-side arrays named in dataset.json", "no such file")
    if entry.get("sha256") != sha256_file(path):
        raise DatasetError(path, "sha256", f"{entry.get('sha256')} (dataset.json)", sha256_file(path))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise DatasetError(path, "file", "an np.savez archive without pickles", f"{type(e).__name__}: {e}") from None
    absent = [k for k in CLASS_SIDE_ARRAYS if k not in arrays]
    if absent:
        raise DatasetError(path, "arrays", f"all of {list(CLASS_SIDE_ARRAYS)}", f"missing {absent}")
    for key in ("class_names", "attribute_names"):
        if not isinstance(manifest[key], list) or not all(isinstance(x, str) for x in manifest[key]):
            raise DatasetError(mpath, key, "a list of strings", repr(manifest[key])[:80])
    clusters = manifest["clusters"]
    if not isinstance(clusters, dict) or not all(isinstance(v, dict) for v in clusters.values()):
        raise DatasetError(mpath, "clusters", "{scheme: {cluster name: [attribute ids]}}", repr(clusters)[:80])
    ids = {}
    for f in ("seen_classes", "unseen_classes", "train_classes", "val_classes"):
        v = manifest[f]
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise DatasetError(mpath, f, "a list of int class ids", repr(v)[:80])
        ids[f] = np.asarray(v, dtype=np.int64)
    cs = ClassSide(
        name=str(manifest["name"]),
        class_names=tuple(manifest["class_names"]),
        attribute_names=tuple(manifest["attribute_names"]),
        attributes_raw=arrays["attributes_raw"],
        attributes=arrays["attributes"],
        word_vectors=arrays["word_vectors"],
        clusters=clusters,
        **ids,
    )
    # Array problems are named after the npz, name/id/cluster problems after dataset.json.
    validate_class_side(cs, f"{path} + {mpath.name}")
    return cs


def _parse_splits(mpath: Path, manifest: dict[str, Any]) -> dict[str, SplitInfo]:
    raw = manifest["splits"]
    if not isinstance(raw, dict):
        raise DatasetError(mpath, "splits", "a {split: {num_rows, shards}} object", type(raw).__name__)
    absent = [s for s in SPLITS if s not in raw]
    if absent:
        raise DatasetError(mpath, "splits", f"all of {list(SPLITS)}", f"missing {absent}")
    unknown = [s for s in raw if s not in SPLITS]
    if unknown:
        raise DatasetError(mpath, "splits", f"only {list(SPLITS)}", f"unknown {unknown}")
    out = {}
    listed: dict[str, str] = {}  # normalized shard file -> the split that lists it
    for name in SPLITS:
        entry = raw[name]
        try:
            shards = tuple(ShardInfo(str(s["file"]), int(s["num_rows"]), str(s["sha256"]),
                                     None if s.get("bytes") is None else int(s["bytes"])) for s in entry["shards"])
            num_rows = int(entry["num_rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(mpath, f"splits.{name}", '{"num_rows", "shards": [{"file", "num_rows", "sha256"}]}',
                               f"{type(e).__name__}: {e}") from None
        for s in shards:  # a shard listed twice would be read twice (or leak across splits)
            key = os.path.normpath(s.file)
            if key in listed:
                where = "twice in this split" if listed[key] == name else f"also in splits.{listed[key]}"
                raise DatasetError(mpath, f"splits.{name}.shards", "each shard file listed once",
                                   f"{s.file} listed {where}")
            listed[key] = name
        total = sum(s.num_rows for s in shards)
        if total != num_rows:
            raise DatasetError(mpath, f"splits.{name}.num_rows", f"the sum of its shards' rows ({total})", num_rows)
        if num_rows == 0:  # every split is trained or evaluated on: an empty one gives a run that means nothing
            raise DatasetError(mpath, f"splits.{name}.num_rows", f"at least 1 row (split {name} is trained or "
                               "evaluated on; an empty one would give a meaningless score)", 0)
        out[name] = SplitInfo(name, num_rows, shards)
    return out


def check_disjoint_splits(mpath: Path, ids: dict[str, np.ndarray]) -> None:
    """DatasetError naming dataset.json and two splits of DISJOINT_SPLITS (both in `ids`) that share sample ids.

    ids: split -> the sample_id column of its shards. Only pairs whose splits are both given are
    checked (a selection-only open reads no test shard).
    """
    found = shared_ids(ids)
    if found is not None:
        a, b, both = found
        n = both.size
        raise DatasetError(mpath, f"splits.{a} and splits.{b}",
                           f"no sample_id in both ({DISJOINT_SPLITS[(a, b)]})",
                           f"{n} sample_id{'s' if n > 1 else ''} in both: {both[:5].tolist()}{' ...' if n > 5 else ''}")


def _verify_shard(ds: FeatureDataset, split: str, shard: ShardInfo, full: bool) -> np.ndarray:
    """Check one shard (see FeatureDataset.open); returns its sample_id column (int64)."""
    path = ds.shard_path(shard)
    if not path.is_file():
        raise DatasetError(path, "file", f"a shard of split {split} (dataset.json)", "no such file")
    if shard.size is not None and path.stat().st_size != shard.size:  # before the footer: says what happened
        raise DatasetError(path, "bytes", f"{shard.size} (dataset.json)", f"{path.stat().st_size}: the file was "
                           "truncated, extended or replaced since the dataset was written")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(path, "file", "a Parquet file", arrow_error(e)) from None
    with pf:
        check_shard_schema(path, pf.schema_arrow, ds.storage_dtype, ds.feature_size)
        if pf.metadata.num_rows != shard.num_rows:
            raise DatasetError(path, "num_rows", f"{shard.num_rows} (dataset.json)", pf.metadata.num_rows)
        if not full:
            # the label and sample_id columns alone (a few KiB a shard): a manifest whose class sets
            # disagree with the shards, or splits that share images, fail here, in the driver, not at
            # the test step inside a worker
            try:
                table = pf.read(columns=["sample_id", "label"])
                labels, sample_ids = table.column("label").to_numpy(), table.column("sample_id").to_numpy()
            except (OSError, pa.ArrowException) as e:
                check_shard_sha256(path, shard.sha256)  # a damaged file is named as such when its bytes changed
                raise DatasetError(path, "label", "a readable label column and sample_id column",
                                   arrow_error(e)) from None
            _check_labels(path, labels, ds, split)
            return sample_ids.astype(np.int64, copy=False)
    # full: the checksum first, so a corrupt shard is named as such, not by what its bytes decode to
    check_shard_sha256(path, shard.sha256)
    with pq.ParquetFile(path) as pf:
        allowed = split_classes(ds.class_side, split)
        first_row, ids = 0, [np.zeros(0, np.int64)]
        for g in range(pf.metadata.num_row_groups):  # one row group at a time: memory stays small
            try:
                table = pf.read_row_group(g, columns=list(COLUMNS))
            except (OSError, pa.ArrowException) as e:
                raise DatasetError(path, f"row group {g}", "a readable Parquet row group",
                                   arrow_error(e)) from None
            _check_labels(path, table.column("label").to_numpy(), ds, split, allowed)
            feats = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            ids.append(table.column("sample_id").to_numpy())
            check_finite_features(path, feats.reshape(table.num_rows, ds.feature_size), ids[-1], first_row)
            first_row += table.num_rows
    return np.concatenate(ids).astype(np.int64, copy=False)


def _check_labels(path: Path, labels: np.ndarray, ds: FeatureDataset, split: str,
                  allowed: np.ndarray | None = None) -> None:
    allowed = split_classes(ds.class_side, split) if allowed is None else allowed
    wrong = np.setdiff1d(labels, allowed)
    if wrong.size:
        raise DatasetError(path, "label", f"classes of {_SPLIT_SIDE[split]} (split {split}, dataset.json)",
                           f"other classes {_brief(wrong)}")
