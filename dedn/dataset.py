"""The on-disk feature dataset (schema_version 1): writer, manifest, validation.

A dataset directory holds::

    <root>/dataset.json               manifest (keys: docs/design.md, "Dataset directory")
    <root>/class_side.npz             attributes_raw (K, D), attributes (K, D), word_vectors (D, G)
    <root>/shards/<split>-NNNNN.parquet
        columns sample_id int64, label int32,
        features fixed_size_list<float16|float32>[C*H*W]  (C-major: F.reshape(C, H, W))

`DatasetWriter` builds one in a temporary sibling directory and renames it into place
only when every split and the class side are complete, so a crash never leaves a
half-written dataset. `FeatureDataset.open` reads and checks one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn.atomic import write_bytes
from dedn.class_side import ClassSide
from dedn.errors import DatasetError

SCHEMA_VERSION = 1
SPLITS = ("trainval", "test_seen", "test_unseen", "train", "val_seen", "val_unseen")
SOURCES = ("synthetic", "hdf5", "xlsa17")
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


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet shard of a split; `file` is relative to the dataset root."""

    file: str
    num_rows: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """A split: its row count and its shards in write order."""

    name: str
    num_rows: int
    shards: tuple[ShardInfo, ...]


def split_classes(class_side: ClassSide, split: str) -> np.ndarray:
    """The class ids (int64, sorted) that rows of `split` may carry (docs/design.md table)."""
    if split not in _SPLIT_SIDE:
        raise DatasetError(class_side.name, "split", f"one of {list(SPLITS)}", repr(split))
    return np.unique(np.asarray(getattr(class_side, _SPLIT_SIDE[split]), dtype=np.int64))


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


class SplitWriter:
    """Streams the rows of one split into Parquet shards; get it from `DatasetWriter.split`."""

    def __init__(self, owner: "DatasetWriter", name: str):
        self._owner, self.name = owner, name
        self._classes = split_classes(owner.class_side, name)
        c, h, w = owner.feature_shape
        self._feature_size = c * h * w
        self._np_dtype = np.dtype(owner.storage_dtype)
        row_bytes = self._feature_size * self._np_dtype.itemsize + 12
        # Row groups of a few MiB (smaller when shards are tiny, so tests still get several
        # groups per shard); shards are a whole number of row groups of at most ~shard_bytes.
        group_bytes = min(ROW_GROUP_BYTES, max(1, owner.shard_bytes // 4))
        self._rows_per_group = max(1, group_bytes // row_bytes)
        groups_per_shard = max(1, (owner.shard_bytes // row_bytes) // self._rows_per_group)
        self._rows_per_shard = self._rows_per_group * groups_per_shard
        self._schema = _shard_schema(owner.storage_dtype, self._feature_size)
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._ids: list[np.ndarray] = []  # every sample id, to reject duplicates at close
        self._shards: list[ShardInfo] = []
        self._pq: pq.ParquetWriter | None = None
        self._pq_tmp: Path | None = None
        self._pq_rows = 0
        self._closed = False
        self.num_rows = 0

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def add(self, sample_ids: np.ndarray, labels: np.ndarray, features: np.ndarray) -> None:
        """Append n rows: sample_ids (n,) int64, labels (n,) int class ids, features (n, C, H, W) float."""
        if self._closed:
            raise DatasetError(self._owner.root, f"splits.{self.name}", "rows added before the split is closed", "a closed split")
        where = f"{self._owner.root} (split {self.name})"
        ids = np.asarray(sample_ids)
        labels = np.asarray(labels)
        feats = np.asarray(features)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DatasetError(where, "sample_ids", "a 1-D integer array", f"{ids.dtype} {ids.shape}")
        n = ids.shape[0]
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(where, "labels", f"a 1-D integer array of {n} labels", f"{labels.dtype} {labels.shape}")
        if feats.shape != (n, *self._owner.feature_shape):
            raise DatasetError(where, "features", f"shape ({n}, {', '.join(map(str, self._owner.feature_shape))})", tuple(feats.shape))
        if not np.issubdtype(feats.dtype, np.floating):
            raise DatasetError(where, "features", "a floating-point array", feats.dtype)
        if n == 0:
            return
        k = self._owner.class_side.num_classes
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.size:
            raise DatasetError(where, "labels", f"class ids in [0, {k})", _brief(bad))
        wrong = np.setdiff1d(labels, self._classes)
        if wrong.size:
            raise DatasetError(where, "labels", f"classes of {_SPLIT_SIDE[self.name]} only", f"other classes {_brief(wrong)}")
        flat = feats.reshape(n, self._feature_size)
        n_bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
        if n_bad:
            raise DatasetError(where, "features", "finite values", f"{n_bad} NaN/inf entries")
        with np.errstate(over="ignore"):  # overflow is reported below as a DatasetError
            stored = flat.astype(self._np_dtype)
        # float32 -> float16 can overflow to inf (|x| > 65504): refuse rather than store inf.
        if self._np_dtype != flat.dtype and not np.isfinite(stored).all():
            raise DatasetError(where, "features", f"values representable in {self._owner.storage_dtype}", "overflow to inf")
        self._buffer.append((ids.astype(np.int64), labels.astype(np.int32), stored))
        self._ids.append(ids.astype(np.int64))
        self._buffered += n
        self.num_rows += n
        self._flush(final=False)

    def _take(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pop the first `rows` buffered rows as three arrays."""
        parts, got = [], 0
        while got < rows:
            ids, labels, feats = self._buffer[0]
            m = min(rows - got, ids.shape[0])
            parts.append((ids[:m], labels[:m], feats[:m]))
            if m == ids.shape[0]:
                self._buffer.pop(0)
            else:
                self._buffer[0] = (ids[m:], labels[m:], feats[m:])
            got += m
        self._buffered -= rows
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def _flush(self, final: bool) -> None:
        while self._buffered >= self._rows_per_group or (final and self._buffered > 0):
            room = self._rows_per_shard - self._pq_rows
            ids, labels, feats = self._take(min(self._rows_per_group, room, self._buffered))
            if self._pq is None:
                self._open_shard()
            values = pa.array(feats.ravel())
            table = pa.Table.from_arrays(
                [pa.array(ids), pa.array(labels),
                 pa.FixedSizeListArray.from_arrays(values, self._feature_size)],
                schema=self._schema,
            )
            assert self._pq is not None
            self._pq.write_table(table, row_group_size=ids.shape[0])
            self._pq_rows += ids.shape[0]
            if self._pq_rows >= self._rows_per_shard:
                self._close_shard()

    def _open_shard(self) -> None:
        index = len(self._shards)
        self._pq_tmp = self._owner._tmp / SHARD_DIR / f"{self.name}-{index:05d}.parquet.tmp"
        # Features are float noise to a compressor and dictionaries never help them; plain
        # uncompressed pages make reading a memcpy.
        self._pq = pq.ParquetWriter(
            self._pq_tmp, self._schema, compression="none", use_dictionary=False,
            write_statistics=["sample_id", "label"],
        )
        self._pq_rows = 0

    def _close_shard(self) -> None:
        assert self._pq is not None and self._pq_tmp is not None
        self._pq.close()
        final = self._pq_tmp.with_name(self._pq_tmp.name[: -len(".tmp")])
        os.replace(self._pq_tmp, final)
        self._shards.append(ShardInfo(f"{SHARD_DIR}/{final.name}", self._pq_rows, sha256_file(final)))
        self._pq, self._pq_tmp, self._pq_rows = None, None, 0

    def close(self) -> SplitInfo:
        """Flush the last rows, check sample ids are unique and register the split."""
        if self._closed:
            return self._owner._splits[self.name]
        self._flush(final=True)
        if self._pq is not None:
            self._close_shard()
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        uniq, counts = np.unique(ids, return_counts=True)
        if uniq.size != ids.size:
            raise DatasetError(f"{self._owner.root} (split {self.name})", "sample_ids", "unique ids within a split",
                               f"repeated ids {_brief(uniq[counts > 1])}")
        self._closed = True
        info = SplitInfo(self.name, self.num_rows, tuple(self._shards))
        self._owner._splits[self.name] = info
        return info

    def _abort(self) -> None:
        if self._pq is not None:
            self._pq.close()
        self._closed = True


class DatasetWriter:
    """Writes a dataset directory atomically: everything goes to a hidden sibling, renamed at close.

    Usage::

        with DatasetWriter(root, class_side=cs, feature_shape=(C, H, W)) as w:
            for split in SPLITS:
                with w.split(split) as s:
                    s.add(ids, labels, feats)   # (n,), (n,), (n, C, H, W)

    An exception inside the `with` removes the temporary directory and leaves `root` untouched.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        class_side: ClassSide,
        feature_shape: tuple[int, int, int],
        storage_dtype: str = "float16",
        source: str = "synthetic",
        semi_synthetic: bool = False,
        shard_bytes: int = 128 * 2**20,
        overwrite: bool = False,
    ):
        self.root = Path(root)
        if storage_dtype not in STORAGE_DTYPES:
            raise DatasetError(self.root, "storage_dtype", f"one of {list(STORAGE_DTYPES)}", repr(storage_dtype))
        if source not in SOURCES:
            raise DatasetError(self.root, "source", f"one of {list(SOURCES)}", repr(source))
        shape = tuple(int(x) for x in feature_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DatasetError(self.root, "feature_shape", "three positive ints (C, H, W)", tuple(feature_shape))
        if shard_bytes < 1:
            raise DatasetError(self.root, "shard_bytes", "a positive byte count", shard_bytes)
        if self.root.exists() and not overwrite:
            raise DatasetError(self.root, "root", "a path that does not exist yet (or overwrite=True)", "an existing path")
        validate_class_side(class_side, f"{self.root} (class side)")
        self.class_side = class_side
        self.feature_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.storage_dtype = storage_dtype
        self.source = source
        self.semi_synthetic = bool(semi_synthetic)
        self.shard_bytes = int(shard_bytes)
        self.overwrite = overwrite
        self._splits: dict[str, SplitInfo] = {}
        self._open: dict[str, SplitWriter] = {}
        self._done = False
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root.parent / f".{self.root.name}.tmp-{uuid.uuid4().hex[:8]}"
        (self._tmp / SHARD_DIR).mkdir(parents=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def split(self, name: str) -> SplitWriter:
        """A writer for split `name`; each split is written exactly once."""
        if self._done:
            raise DatasetError(self.root, "split", "a split opened before close()", "a closed writer")
        if name not in SPLITS:
            raise DatasetError(self.root, "split", f"one of {list(SPLITS)}", repr(name))
        if name in self._open:
            raise DatasetError(self.root, f"splits.{name}", "each split written once", "a second write")
        writer = SplitWriter(self, name)
        self._open[name] = writer
        return writer

    def manifest(self, class_side_sha256: str) -> dict[str, Any]:
        """The dataset.json content for the splits written so far."""
        cs = self.class_side
        return {
            "schema_version": SCHEMA_VERSION,
            "name": cs.name,
            "source": self.source,
            "semi_synthetic": self.semi_synthetic,
            "feature_shape": list(self.feature_shape),
            "storage_dtype": self.storage_dtype,
            "class_names": list(cs.class_names),
            "attribute_names": list(cs.attribute_names),
            **{f: [int(c) for c in getattr(cs, f)]
               for f in ("seen_classes", "unseen_classes", "train_classes", "val_classes")},
            "clusters": {scheme: {str(n): [int(a) for a in ids] for n, ids in clusters.items()}
                         for scheme, clusters in cs.clusters.items()},
            "class_side": {"file": CLASS_SIDE_FILE, "sha256": class_side_sha256},
            "splits": {s.name: {"num_rows": s.num_rows,
                                "shards": [{"file": h.file, "num_rows": h.num_rows, "sha256": h.sha256} for h in s.shards]}
                       for s in (self._splits[n] for n in SPLITS if n in self._splits)},
            "created_by": f"dedn.dataset.DatasetWriter (schema {SCHEMA_VERSION}, pyarrow {pa.__version__})",
        }

    def close(self) -> Path:
        """Finish: close open splits, require all six, write class_side.npz and dataset.json, rename into place."""
        if self._done:
            return self.root
        try:
            for w in self._open.values():
                w.close()
            missing = [s for s in SPLITS if s not in self._splits]
            if missing:
                raise DatasetError(self.root, "splits", f"all of {list(SPLITS)} written", f"missing {missing}")
            cs_path = self._tmp / CLASS_SIDE_FILE
            with open(cs_path, "wb") as f:
                np.savez(
                    f,
                    attributes_raw=np.asarray(self.class_side.attributes_raw),
                    attributes=np.asarray(self.class_side.attributes, dtype=np.float32),
                    word_vectors=np.asarray(self.class_side.word_vectors, dtype=np.float32),
                )
            text = json.dumps(self.manifest(sha256_file(cs_path)), indent=1)
            write_bytes(self._tmp / MANIFEST_FILE, text.encode(), fsync=True)
            self._install()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.root

    def _install(self) -> None:
        """Move the finished temp directory to root; an old root is removed only after that."""
        old = None
        if self.root.exists() or self.root.is_symlink():
            if not self.overwrite:
                raise DatasetError(self.root, "root", "a path that does not exist yet (or overwrite=True)", "an existing path")
            old = self.root.parent / f".{self.root.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.root, old)
        try:
            os.replace(self._tmp, self.root)
        except BaseException:
            if old is not None:
                os.replace(old, self.root)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()

    def abort(self) -> None:
        """Drop everything written so far; root is left as it was."""
        for w in self._open.values():
            w._abort()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = True


class FeatureDataset:
    """A dataset directory opened for reading; shards are read by `dedn.reader.ShardReader`."""

    def __init__(self, root: Path, manifest: dict[str, Any], class_side: ClassSide, splits: dict[str, SplitInfo]):
        self.root = root
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
        every sha256, that every label belongs to its split's classes and that every feature is
        finite. `splits` limits the shard checks to those splits (a sweep never opens the test
        shards). Whatever the mode, a shard file listed twice in dataset.json is refused, and a
        ShardReader checks each shard's sha256 before its first read and the features it decodes.
        """
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
        if verify != "none":
            for info in (parsed.values() if splits is None else [ds.split(s) for s in splits]):
                for shard in info.shards:
                    _verify_shard(ds, info.name, shard, full=verify == "full")
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
            shards = tuple(ShardInfo(str(s["file"]), int(s["num_rows"]), str(s["sha256"])) for s in entry["shards"])
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
        out[name] = SplitInfo(name, num_rows, shards)
    return out


def _verify_shard(ds: FeatureDataset, split: str, shard: ShardInfo, full: bool) -> None:
    path = ds.shard_path(shard)
    if not path.is_file():
        raise DatasetError(path, "file", f"a shard of split {split} (dataset.json)", "no such file")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(path, "file", "a Parquet file", arrow_error(e)) from None
    with pf:
        check_shard_schema(path, pf.schema_arrow, ds.storage_dtype, ds.feature_size)
        if pf.metadata.num_rows != shard.num_rows:
            raise DatasetError(path, "num_rows", f"{shard.num_rows} (dataset.json)", pf.metadata.num_rows)
    if full:  # the checksum first: a corrupt shard is named as such, not by what its bytes decode to
        check_shard_sha256(path, shard.sha256)
        with pq.ParquetFile(path) as pf:
            allowed = split_classes(ds.class_side, split)
            first_row = 0
            for g in range(pf.metadata.num_row_groups):  # one row group at a time: memory stays small
                try:
                    table = pf.read_row_group(g, columns=list(COLUMNS))
                except (OSError, pa.ArrowException) as e:
                    raise DatasetError(path, f"row group {g}", "a readable Parquet row group",
                                       arrow_error(e)) from None
                labels = table.column("label").to_numpy()
                wrong = np.setdiff1d(labels, allowed)
                if wrong.size:
                    raise DatasetError(path, "label", f"classes of {_SPLIT_SIDE[split]} (split {split})",
                                       f"other classes {_brief(wrong)}")
                feats = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                check_finite_features(path, feats.reshape(table.num_rows, ds.feature_size),
                                      table.column("sample_id").to_numpy(), first_row)
                first_row += table.num_rows
