"""Turn published feature files into a dataset directory (docs/design.md#dataset-directory-schema_version-1).

* `convert_hdf5`: DAZLE/MSDN/DEDN-style HDF5 feature maps, keys ``feature_map`` (N, C, H, W),
  ``labels`` (N,) 0-based, ``trainval_loc`` / ``test_seen_loc`` / ``test_unseen_loc`` 0-based;
  read in blocks of rows (never the whole array).
* `convert_xlsa17`: xlsa17 ``res101.mat`` (``features`` 2048 x N pooled, ``labels`` N x 1 1-based)
  as 1 x 1 maps.

The class side always comes from att_splits.mat and a word-vector file (`dedn.data.sources`); the
selection splits (train / val_seen / val_unseen) from att_splits' train_loc / val_loc.
`write_dataset` is the one place that routes feature chunks to the six splits; the
semi-synthetic generator uses it too.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from dedn.data.class_side import ClassSide
from dedn.data import SPLITS, DatasetWriter
from dedn.data.format import DISJOINT_SPLITS, shared_ids
from dedn.errors import DatasetError
from dedn.data.sources import ClassSideSource, build_class_side, load_res101, load_xlsa17, make_splits

HDF5_KEYS = ("feature_map", "labels", "trainval_loc", "test_seen_loc", "test_unseen_loc")


def write_dataset(
    root: str | Path, class_side: ClassSide, split_ids: Mapping[str, np.ndarray],
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], *, feature_shape: tuple[int, int, int],
    storage_dtype: str = "float16", source: str = "synthetic", semi_synthetic: bool = False,
    overwrite: bool = False, progress: bool = True, shard_bytes: int | None = None, total: int | None = None,
    skipped: np.ndarray | None = None,
) -> Path:
    """Write every split from one pass over (sample_ids (n,), labels (n,), features (n, C, H, W)) chunks.

    split_ids: split -> the image ids it holds; an image in several splits is written to each
    (trainval and a selection split), but no split may be empty and no two splits of
    format.DISJOINT_SPLITS may share an image: both are refused before anything is written.
    Chunks may cover images of no split (they are skipped). `skipped`: image ids left out on
    purpose (unreadable images under --skip-bad); every other image keeps its split. Raises
    DatasetError when a split did not receive all its images; nothing is left on disk then.
    """
    wanted = {s: np.unique(np.asarray(split_ids[s], dtype=np.int64)) for s in SPLITS}
    if skipped is not None and len(skipped):
        wanted = {s: np.setdiff1d(ids, skipped) for s, ids in wanted.items()}
    # make_splits names att_splits.mat for these; this catches any other caller's split ids
    for name, ids in wanted.items():
        if ids.size == 0:
            left = " left after the skipped images" if skipped is not None and len(skipped) else ""
            raise DatasetError(root, f"splits.{name}", "at least one image in every split", f"none{left}")
    found = shared_ids(wanted)
    if found is not None:
        a, b, both = found
        raise DatasetError(root, f"splits.{a} and splits.{b}", f"no image in both ({DISJOINT_SPLITS[(a, b)]})",
                           f"{both.size} shared, e.g. image ids {both[:5].tolist()}")
    kwargs = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    with DatasetWriter(root, class_side=class_side, feature_shape=feature_shape, storage_dtype=storage_dtype,
                       source=source, semi_synthetic=semi_synthetic, overwrite=overwrite, **kwargs) as writer:
        splits = {s: writer.split(s) for s in SPLITS}
        bar = tqdm(total=total, unit="img", desc=f"writing {Path(root).name}", disable=not progress)
        for ids, labels, feats in chunks:
            ids = np.asarray(ids, dtype=np.int64)
            for name, sw in splits.items():
                pos = np.searchsorted(wanted[name], ids).clip(max=max(wanted[name].size - 1, 0))
                mask = wanted[name][pos] == ids if wanted[name].size else np.zeros(ids.shape, bool)
                if mask.any():
                    sw.add(ids[mask], labels[mask], feats[mask])
            bar.update(ids.size)
        bar.close()
        for name, sw in splits.items():
            if sw.num_rows != wanted[name].size:
                raise DatasetError(root, f"splits.{name}", f"{wanted[name].size} images", f"{sw.num_rows} written")
    return Path(root)


# ---------------------------------------------------------------- HDF5 feature maps

def _check_loc(path: Path, key: str, loc: np.ndarray, n: int) -> np.ndarray:
    loc = np.asarray(loc).ravel()
    if loc.size == 0 or not np.issubdtype(loc.dtype, np.number):
        raise DatasetError(path, key, "a non-empty vector of 0-based image indices", f"{loc.dtype} {loc.shape}")
    if np.issubdtype(loc.dtype, np.floating) and not np.all(loc == np.round(loc)):
        raise DatasetError(path, key, "integer image indices", "fractional values")
    loc = loc.astype(np.int64)
    if loc.min() < 0 or loc.max() >= n:
        raise DatasetError(path, key, f"0-based image indices in [0, {n})", f"range [{loc.min()}, {loc.max()}]")
    return loc


def _hdf5_source(path: Path, f: "h5py.File", name: str, att_splits: Path, word_vectors: Path,  # noqa: F821
                 attribute_dir: Path | None, seed: int) -> tuple[ClassSideSource, "h5py.Dataset"]:  # noqa: F821
    missing = [k for k in HDF5_KEYS if k not in f]
    if missing:
        raise DatasetError(path, "keys", f"all of {list(HDF5_KEYS)}", f"missing {missing} (found {sorted(f.keys())})")
    fm = f["feature_map"]
    if fm.ndim != 4:
        raise DatasetError(path, "feature_map", "an N x C x H x W array", tuple(fm.shape))
    if not np.issubdtype(fm.dtype, np.floating):
        raise DatasetError(path, "feature_map", "floating-point values", fm.dtype)
    n = fm.shape[0]
    labels = np.asarray(f["labels"][()]).ravel()
    if labels.shape != (n,):
        raise DatasetError(path, "labels", f"{n} labels (rows of feature_map)", tuple(np.asarray(f["labels"]).shape))
    if not np.issubdtype(labels.dtype, np.number) or (np.issubdtype(labels.dtype, np.floating)
                                                      and not np.all(labels == np.round(labels))):
        raise DatasetError(path, "labels", "integer class ids", labels.dtype)
    labels = labels.astype(np.int64)
    src = load_xlsa17(name, att_splits, word_vectors, attribute_dir)
    for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
        loc = _check_loc(path, key, f[key][()], n)
        ref = src.locs[key]  # same names; 1-based in att_splits, already 0-based here
        if not np.array_equal(np.sort(loc), np.sort(ref)):
            raise DatasetError(path, key, f"the images of {key} in {att_splits} ({ref.size}, 1-based there)",
                               f"{loc.size} images, {np.setxor1d(loc, ref).size} differing")
    k = src.num_classes
    if labels.min() < 0 or labels.max() >= k:
        hint = " (labels look 1-based)" if labels.min() == 1 and labels.max() == k else ""
        raise DatasetError(path, "labels", f"0-based class ids in [0, {k}) ({att_splits} has K={k}){hint}",
                           f"range [{labels.min()}, {labels.max()}]")
    return src.with_labels(labels, str(path), seed), fm


def convert_hdf5(features: str | Path, att_splits: str | Path, word_vectors: str | Path, name: str,
                 out: str | Path, *, attribute_dir: str | Path | None = None, storage_dtype: str = "float16",
                 block_rows: int = 256, seed: int = 0, overwrite: bool = False, progress: bool = True,
                 shard_bytes: int | None = None) -> Path:
    """Convert an HDF5 feature-map file; rows are read in blocks of `block_rows` (peak memory ~ one block)."""
    import h5py  # HDF5 (heavy): only this converter needs it

    path = Path(features)
    if not path.is_file():
        raise DatasetError(path, "file", "an HDF5 feature-map file", "no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(path, "file", "an HDF5 file", f"{type(e).__name__}: {e}") from None
    with f:
        src, fm = _hdf5_source(path, f, name, Path(att_splits), Path(word_vectors),
                               Path(attribute_dir) if attribute_dir else None, seed)
        assert src.labels is not None
        n = fm.shape[0]

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            for start in range(0, n, block_rows):
                stop = min(n, start + block_rows)
                block = np.asarray(fm[start:stop])  # (b, C, H, W): contiguous rows read at disk speed
                bad = ~np.isfinite(block).reshape(stop - start, -1).all(axis=1)
                if bad.any():
                    raise DatasetError(path, "feature_map", "finite values", f"NaN/inf in rows {(start + np.flatnonzero(bad))[:5].tolist()}")
                yield np.arange(start, stop, dtype=np.int64), src.labels[start:stop], block

        return write_dataset(out, build_class_side(src), make_splits(src.labels, src.locs, seed, src.origin), chunks(),
                             feature_shape=tuple(fm.shape[1:]), storage_dtype=storage_dtype, source="hdf5",
                             overwrite=overwrite, progress=progress, shard_bytes=shard_bytes, total=n)


# ---------------------------------------------------------------- xlsa17 res101.mat

def convert_xlsa17(res101: str | Path, att_splits: str | Path, word_vectors: str | Path, name: str,
                   out: str | Path, *, attribute_dir: str | Path | None = None, storage_dtype: str = "float16",
                   block_rows: int = 1024, seed: int = 0, overwrite: bool = False, progress: bool = True,
                   shard_bytes: int | None = None) -> Path:
    """Convert xlsa17 pooled ResNet-101 features (C x N) into 1 x 1 maps (N, C, 1, 1)."""
    path = Path(res101)
    mat = load_res101(path, ("features", "labels"))
    missing = [k for k in ("features", "labels") if k not in mat]
    if missing:
        raise DatasetError(path, "keys", "features (C x N) and labels (N x 1, 1-based)", f"missing {missing}")
    feats = np.asarray(mat["features"])
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.number):
        raise DatasetError(path, "features", "a numeric C x N matrix", f"{feats.dtype} {feats.shape}")
    c, n = feats.shape
    raw = np.asarray(mat["labels"]).ravel()
    if raw.shape != (n,):
        raise DatasetError(path, "labels", f"{n} labels (columns of features)", tuple(np.asarray(mat["labels"]).shape))
    if not np.issubdtype(raw.dtype, np.number) or not np.all(raw == np.round(raw)):
        raise DatasetError(path, "labels", "integer class ids", raw.dtype)
    src = load_xlsa17(name, att_splits, word_vectors, attribute_dir)
    k = src.num_classes
    if raw.min() < 1 or raw.max() > k:
        hint = " (labels look 0-based)" if raw.min() == 0 else ""
        raise DatasetError(path, "labels", f"1-based class ids in [1, {k}] ({att_splits} has K={k}){hint}",
                           f"range [{raw.min()}, {raw.max()}]")
    labels = raw.astype(np.int64) - 1
    src = src.with_labels(labels, str(path), seed)
    splits = make_splits(labels, src.locs, seed, src.origin)
    # only now, with every input read and checked: the note must not precede an error about a bad file
    warnings.warn(f"{path}: pooled features give 1 x 1 maps; region attention degenerates with a single region "
                  "(use HDF5 feature maps for the paper's setting)", stacklevel=2)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            block = np.ascontiguousarray(feats[:, start:stop].T, dtype=np.float32)  # (b, C)
            if not np.isfinite(block).all():
                rows = start + np.flatnonzero(~np.isfinite(block).all(axis=1))
                raise DatasetError(path, "features", "finite values", f"NaN/inf in images {rows[:5].tolist()}")
            yield np.arange(start, stop, dtype=np.int64), labels[start:stop], block.reshape(stop - start, c, 1, 1)

    return write_dataset(out, build_class_side(src), splits, chunks(),
                         feature_shape=(c, 1, 1), storage_dtype=storage_dtype, source="xlsa17",
                         overwrite=overwrite, progress=progress, shard_bytes=shard_bytes, total=n)
