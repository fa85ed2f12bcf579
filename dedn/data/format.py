"""The on-disk feature dataset's format (schema_version 1): constants, shard and split records, checks.

A dataset directory holds::

    <root>/dataset.json               manifest (keys: docs/design.md#dataset-directory-schema_version-1)
    <root>/class_side.npz             attributes_raw (K, D), attributes (K, D), word_vectors (D, G)
    <root>/shards/<split>-NNNNN.parquet
        columns sample_id int64, label int32,
        features fixed_size_list<float16|float32>[C*H*W]  (C-major: F.reshape(C, H, W))

The writer (`dedn.data.writer`) and the reader side (`dedn.data.dataset`, `dedn.data.reader`)
both check against what is defined here: the schema, checksums, finite features, class sides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from dedn.data.class_side import ClassSide
from dedn.errors import DatasetError


SCHEMA_VERSION = 1
SPLITS = ("trainval", "test_seen", "test_unseen", "train", "val_seen", "val_unseen")
SOURCES = ("synthetic", "hdf5", "xlsa17", "images")
STORAGE_DTYPES = ("float16", "float32")
VERIFY_MODES = ("none", "rows", "full")
MANIFEST_FILE = "dataset.json"
CLASS_SIDE_FILE = "class_side.npz"
SHARD_DIR = "shards"
CLASS_SIDE_ARRAYS = ("attributes_raw", "attributes", "word_vectors")
COLUMNS = ("sample_id", "label", "features")
# A row group is the unit a reader streams; a few MiB keeps peak reader memory small
# while each read is still large enough to run at disk speed.
ROW_GROUP_BYTES = 4 * 2**20
_REQUIRED_KEYS = (
    "schema_version", "name", "source", "semi_synthetic", "feature_shape", "storage_dtype",
    "class_names", "attribute_names", "seen_classes", "unseen_classes", "train_classes",
    "val_classes", "clusters", "class_side", "splits", "created_by",
)
_SPLIT_SIDE = {  # split -> the ClassSide field naming the classes it may hold
    "trainval": "seen_classes",
    "test_seen": "seen_classes",
    "test_unseen": "unseen_classes",
    "train": "train_classes",
    "val_seen": "train_classes",
    "val_unseen": "val_classes",
}
# Pairs of splits that must share no image (sample_id), each with the reason. trainval, test_seen and
# test_unseen partition the Proposed Split's images; the selection splits are drawn from trainval
# (that overlap is by design, so it is not listed) and hold no test image and none of each other's.
DISJOINT_SPLITS: dict[tuple[str, str], str] = {
    ("trainval", "test_seen"): "an image in both would be trained on and then tested on",
    ("trainval", "test_unseen"): "an image in both would be trained on and then tested on",
    ("test_seen", "test_unseen"): "an image is of a seen or of an unseen class, not both",
    ("test_seen", "train"): "model selection never sees a test image",
    ("test_seen", "val_seen"): "model selection never sees a test image",
    ("test_seen", "val_unseen"): "model selection never sees a test image",
    ("test_unseen", "train"): "model selection never sees a test image",
    ("test_unseen", "val_seen"): "model selection never sees a test image",
    ("test_unseen", "val_unseen"): "model selection never sees a test image",
    ("train", "val_seen"): "an image validated on must not be trained on",
    ("train", "val_unseen"): "an image validated on must not be trained on",
    ("val_seen", "val_unseen"): "an image is of a train or of a validation class, not both",
}


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet shard of a split; `file` is relative to the dataset root."""

    file: str
    num_rows: int
    sha256: str
    # bytes on disk: checked by every open in seconds (a truncated or appended-to shard), while the
    # sha256 is checked as the shard is read; None in manifests written before it was recorded
    size: int | None = None


@dataclass(frozen=True)
class SplitInfo:
    """A split: its row count and its shards in write order."""

    name: str
    num_rows: int
    shards: tuple[ShardInfo, ...]


def split_classes(class_side: ClassSide, split: str) -> np.ndarray:
    """The class ids (int64, sorted) that rows of `split` may carry (docs/design.md#dataset-directory-schema_version-1, table)."""
    if split not in _SPLIT_SIDE:
        raise DatasetError(class_side.name, "split", f"one of {list(SPLITS)}", repr(split))
    return np.unique(np.asarray(getattr(class_side, _SPLIT_SIDE[split]), dtype=np.int64))


def shared_ids(ids: Mapping[str, np.ndarray]) -> tuple[str, str, np.ndarray] | None:
    """The first pair of DISJOINT_SPLITS (both present in `ids`) that shares ids, with the shared ids (sorted).

    ids: split -> its sample ids (image indices). None when every such pair is disjoint.
    """
    for a, b in DISJOINT_SPLITS:
        if a in ids and b in ids:
            both = np.intersect1d(np.asarray(ids[a]), np.asarray(ids[b]))
            if both.size:
                return a, b, both
    return None


def sha256_file(path: Path, chunk_bytes: int = 8 * 2**20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard_sha256(path: Path, expected: str) -> str:
    """Hash a shard and DatasetError(path, "sha256", ...) unless it equals the manifest's value; returns it."""
    try:
        digest = sha256_file(path)
    except FileNotFoundError:
        raise DatasetError(path, "file", "a shard listed in dataset.json", "no such file") from None
    except OSError as e:
        raise DatasetError(path, "file", "a readable shard", f"{type(e).__name__}: {e}") from None
    if digest != expected:
        raise DatasetError(path, "sha256", f"{expected} (dataset.json)", digest)
    return digest


def arrow_error(e: BaseException) -> str:
    """An Arrow exception as one line for a DatasetError's `found` (Arrow's messages span lines)."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def nonfinite_rows(features: np.ndarray) -> np.ndarray:
    """Indices (int64, sorted) of the rows of a (n, F) float array that hold a NaN or an infinity.

    float16 rows are checked on their bits (exponent all ones), about 5x faster than np.isfinite.
    """
    feats = np.asarray(features)
    if feats.size == 0:
        return np.zeros(0, np.int64)
    feats = feats.reshape(feats.shape[0], -1)
    if feats.dtype == np.float16:
        exponent = feats.view(np.uint16) & np.uint16(0x7C00)
        if exponent.max() != 0x7C00:
            return np.zeros(0, np.int64)
        return np.flatnonzero((exponent == 0x7C00).any(axis=1))
    ok = np.isfinite(feats)
    if ok.all():
        return np.zeros(0, np.int64)
    return np.flatnonzero(~ok.all(axis=1))


def check_finite_features(path: Path, features: np.ndarray, sample_ids: np.ndarray, first_row: int = 0) -> None:
    """DatasetError naming the shard, the row (within the shard) and its sample_id of the first non-finite row.

    features (n, F) and sample_ids (n,) are rows first_row .. first_row + n - 1 of the shard at `path`.
    """
    bad = nonfinite_rows(features)
    if bad.size:
        r = int(bad[0])
        more = f" and {bad.size - 1} more rows of this read" if bad.size > 1 else ""
        raise DatasetError(path, "features", "finite values (no NaN/inf)",
                           f"NaN/inf in row {first_row + r} (sample_id {int(np.asarray(sample_ids)[r])}){more}")


def _brief(values: np.ndarray, limit: int = 5) -> str:
    """A short printable list of offending values for an error message."""
    values = np.asarray(values).ravel()
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if values.size > limit else ''}] ({values.size} in all)"


def validate_clusters(
    clusters: Mapping[str, Sequence[int]], num_attributes: int, where: str, field: str = "clusters"
) -> None:
    """Check that one clustering scheme {cluster name: attribute ids} is a partition of range(D).

    Raises DatasetError(where, field, ...) on an empty scheme, an empty cluster, an id out of
    range, an attribute in two clusters or an attribute in none.
    """
    if not isinstance(clusters, Mapping) or len(clusters) == 0:
        raise DatasetError(where, field, "a non-empty {cluster name: [attribute ids]} mapping", repr(clusters)[:80])
    owner: dict[int, str] = {}
    for name, ids in clusters.items():
        ids_list = list(ids) if isinstance(ids, (list, tuple, np.ndarray)) else None
        if not ids_list:
            raise DatasetError(where, f"{field}.{name}", "a non-empty list of attribute ids", repr(ids)[:80])
        for a in ids_list:
            if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)):
                raise DatasetError(where, f"{field}.{name}", "integer attribute ids", repr(a))
            if not 0 <= int(a) < num_attributes:
                raise DatasetError(where, f"{field}.{name}", f"attribute ids in [0, {num_attributes})", int(a))
            if int(a) in owner:
                raise DatasetError(
                    where, field, "disjoint clusters",
                    f"attribute {int(a)} in both {owner[int(a)]!r} and {name!r}",
                )
            owner[int(a)] = str(name)
    missing = sorted(set(range(num_attributes)) - owner.keys())
    if missing:
        raise DatasetError(
            where, field, f"clusters covering all {num_attributes} attributes",
            f"attributes in no cluster: {_brief(np.array(missing))}",
        )


def _check_ids(where: str, field: str, ids: np.ndarray, num_classes: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DatasetError(where, field, "a 1-D integer array of class ids", f"{ids.dtype} {ids.shape}")
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
        raise DatasetError(where, field, f"class ids in [0, {num_classes})", _brief(bad))
    if np.unique(ids).size != ids.size:
        raise DatasetError(where, field, "distinct class ids", "duplicates")
    return ids


def validate_class_side(class_side: ClassSide, where: str) -> None:
    """Check shapes, finiteness, class-id sets and every clustering scheme of a ClassSide.

    K = len(class_names), D = len(attribute_names): attributes_raw and attributes must be
    (K, D), word_vectors (D, G); all finite; seen and unseen disjoint and covering nothing
    out of range; train and val disjoint subsets of seen.
    """
    k, d = len(class_side.class_names), len(class_side.attribute_names)
    for name in CLASS_SIDE_ARRAYS:
        arr = np.asarray(getattr(class_side, name))
        if name == "word_vectors":
            ok, expected = arr.ndim == 2 and arr.shape[0] == d, f"shape (D={d}, G) (D = len(attribute_names))"
        else:
            ok, expected = arr.shape == (k, d), f"shape (K={k}, D={d}) (len(class_names), len(attribute_names))"
        if not ok:
            raise DatasetError(where, name, expected, tuple(arr.shape))
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise DatasetError(where, name, "a real-valued numeric array", arr.dtype)
        n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            raise DatasetError(where, name, "finite values", f"{n_bad} NaN/inf entries")
    ids = {f: _check_ids(where, f, getattr(class_side, f), k)
           for f in ("seen_classes", "unseen_classes", "train_classes", "val_classes")}
    if ids["seen_classes"].size == 0:
        raise DatasetError(where, "seen_classes", "at least one class", "none")
    both = np.intersect1d(ids["seen_classes"], ids["unseen_classes"])
    if both.size:
        raise DatasetError(where, "unseen_classes", "classes disjoint from seen_classes", f"shared {_brief(both)}")
    for f in ("train_classes", "val_classes"):
        outside = np.setdiff1d(ids[f], ids["seen_classes"])
        if outside.size:
            raise DatasetError(where, f, "a subset of seen_classes", f"unseen or absent classes {_brief(outside)}")
    both = np.intersect1d(ids["train_classes"], ids["val_classes"])
    if both.size:
        raise DatasetError(where, "val_classes", "classes disjoint from train_classes", f"shared {_brief(both)}")
    if not isinstance(class_side.clusters, Mapping):
        raise DatasetError(where, "clusters", "a {scheme: {cluster: [attribute ids]}} mapping", type(class_side.clusters))
    for scheme, clusters in class_side.clusters.items():
        validate_clusters(clusters, d, where, field=f"clusters.{scheme}")


def _shard_schema(storage_dtype: str, feature_size: int) -> pa.Schema:
    value_type = pa.float16() if storage_dtype == "float16" else pa.float32()
    return pa.schema([
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("features", pa.list_(pa.field("item", value_type, nullable=False), feature_size), nullable=False),
    ])


def check_shard_schema(path: Path, found: pa.Schema, storage_dtype: str, feature_size: int) -> None:
    """DatasetError unless `found` has the shard columns, types and list size (list field names may differ)."""
    expected = _shard_schema(storage_dtype, feature_size)
    ok = found.names == list(COLUMNS) and all(found.field(n).type == expected.field(n).type for n in COLUMNS[:2])
    if ok:
        ftype = found.field("features").type
        ok = (pa.types.is_fixed_size_list(ftype) and ftype.list_size == feature_size
              and ftype.value_type == expected.field("features").type.value_type)
    if not ok:
        raise DatasetError(path, "schema", str(expected).replace("\n", "; "), str(found).replace("\n", "; "))
