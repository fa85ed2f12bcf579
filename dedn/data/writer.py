"""Writing a feature dataset: `DatasetWriter` builds one in a temporary sibling directory and
renames it into place only when every split and the class side are complete, so a crash never
leaves a half-written dataset (`SplitWriter` writes one split's shards, each to a temp name)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedn.atomic import output_errors, write_bytes
from dedn.data.class_side import ClassSide
from dedn.errors import DatasetError
from dedn.data.format import (
    SCHEMA_VERSION, SPLITS, SOURCES, STORAGE_DTYPES, MANIFEST_FILE, CLASS_SIDE_FILE, SHARD_DIR,
    ROW_GROUP_BYTES, _SPLIT_SIDE, ShardInfo, SplitInfo, split_classes, sha256_file, _brief,
    validate_class_side, _shard_schema,
)


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
        with output_errors(self._owner.root, self._owner._tmp):  # a full disk: named, and the writer aborts
            self._write_groups(final)

    def _write_groups(self, final: bool) -> None:
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
        self._shards.append(ShardInfo(f"{SHARD_DIR}/{final.name}", self._pq_rows, sha256_file(final), final.stat().st_size))
        self._pq, self._pq_tmp, self._pq_rows = None, None, 0

    def close(self) -> SplitInfo:
        """Flush the last rows, check sample ids are unique and register the split."""
        if self._closed:
            return self._owner._splits[self.name]
        self._flush(final=True)
        if self._pq is not None:
            with output_errors(self._owner.root, self._owner._tmp):
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
        self._tmp = self.root.parent / f".{self.root.name}.tmp-{uuid.uuid4().hex[:8]}"
        with output_errors(self.root, self._tmp):
            self.root.parent.mkdir(parents=True, exist_ok=True)
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
                                "shards": [{"file": h.file, "num_rows": h.num_rows, "sha256": h.sha256, "bytes": h.size}
                                           for h in s.shards]}
                       for s in (self._splits[n] for n in SPLITS if n in self._splits)},
            "created_by": f"dedn.data.DatasetWriter (schema {SCHEMA_VERSION}, pyarrow {pa.__version__})",
        }

    def close(self) -> Path:
        """Finish: close open splits, require all six, write class_side.npz and dataset.json, rename into place."""
        if self._done:
            return self.root
        try:
            with output_errors(self.root, self._tmp):
                self._finish()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.root

    def _finish(self) -> None:
        """close()'s body: the splits, the class side, the manifest, the rename."""
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
