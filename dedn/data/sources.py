"""The class side of a dataset as published: xlsa17 `att_splits.mat`, attribute word vectors, image labels.

(One module: each published file's reader sits next to the checks that name its fields.)

Two ways in, one result (`ClassSideSource`):

* a folder laid out like ``../shared/data/<DS>`` (``att_splits.mat``, ``<DS>_attribute.pkl``,
  ``image_labels.npz`` and an attribute-name file), read by `load_source(name, source_dir)`;
* a packaged asset ``dedn/data/assets/<DS>.npz`` (plain arrays, no pickles) written from such a folder by
  ``tools/pack_assets.py``, read by `load_source(name)`, so that a demo runs without the folder.

All locations are converted to 0-based on the way in. `build_class_side` turns a source into
the `ClassSide` the model uses; `make_splits` turns labels and locations into the six splits of
docs/design.md#dataset-directory-schema_version-1.
"""
from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dedn.atomic import atomic_path
from dedn.data.class_side import ClassSide, normalize_rows
from dedn.data.clusters import default_clusters
from dedn.data.format import DISJOINT_SPLITS, shared_ids
from dedn.errors import DatasetError

ASSET_DIR = Path(__file__).resolve().parent / "assets"
# xlsa17 location fields (1-based in att_splits.mat, 0-based everywhere in dedn).
LOC_FIELDS = ("trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc", "val_loc")
# Share of train_loc images that go to `val_seen` (the rest form `train`).
VAL_SEEN_FRACTION = 0.2
# Share of the seen classes held out as validation classes when a file has no train_loc/val_loc
# (xlsa17's own class splits hold out about a third: CUB 50 of 150, AWA2 13 of 40).
VAL_CLASS_FRACTION = 1 / 3
# Locations every att_splits.mat must have; train_loc/val_loc (and original_att, allclasses_names)
# are missing from some circulating copies and are then derived, with a warning.
REQUIRED_LOC_FIELDS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")
CLASS_SPLIT_FIELDS = ("train_loc", "val_loc")
# Location pairs that must share no image, each with the reason. The Proposed Split's three are
# pairwise disjoint. xlsa17's train_loc/val_loc predate it and cover every seen-class image, so they
# legitimately include test_seen images (make_splits drops those); a test_unseen image in them, or
# an image in both, would leak into model selection.
DISJOINT_LOCS: dict[tuple[str, str], str] = {
    ("trainval_loc", "test_seen_loc"): "an image in both would be trained on and then tested on",
    ("trainval_loc", "test_unseen_loc"): "an image in both would be trained on and then tested on",
    ("test_seen_loc", "test_unseen_loc"): "an image is of a seen or of an unseen class, not both",
    ("train_loc", "test_unseen_loc"): "train_loc feeds model selection, which never sees a test image",
    ("val_loc", "test_unseen_loc"): "val_loc feeds model selection, which never sees a test image",
    ("train_loc", "val_loc"): "an image validated on must not be trained on",
}
# Datasets whose original_att has a documented missing-value mark, and the mark. Animals with
# Attributes (AWA1 and AWA2) publish their class-attribute strengths as predicate-matrix-continuous.txt,
# where -1 (-1.00) marks a missing value; xlsa17's original_att copies that matrix (AWA2 has 4 marks:
# class antelope, predicates black, white, blue, brown). Only exactly this value is a mark; every
# other value, negative ones included (FLO's attributes are signed sentence embeddings), is kept.
MISSING_VALUE_MARKS: dict[str, float] = {"AWA1": -1.0, "AWA2": -1.0}
# What an image_labels.npz holds (as the shared folders have it) and how to make one.
IMAGE_LABELS_HELP = (
    "an image_labels.npz holding `labels` (N,) int64, the 0-based class of every image in res101.mat order "
    "(required; res101.mat's 1-based labels minus 1), and as written by the command below also trainval_loc, "
    "test_seen_loc, test_unseen_loc (0-based image indices of att_splits.mat's splits), seenclasses, "
    "unseenclasses (0-based class ids) and image_files (the image paths, res101.mat order); make it with "
    "`python jobs/prepare_data.py image-labels --res101 res101.mat --att-splits att_splits.mat --out {out}`"
)


class DerivedFieldWarning(UserWarning):
    """A field the class-side file lacks was derived from what it has (see the message)."""
_WORD_VECTOR_HELP = (
    "a D x G word-vector array (one row per attribute, in att_splits.mat `att` row order) as "
    ".npy, .txt or .pkl; datasets without one (APY, AWA1) need `--word-vectors FILE`"
)

# The only globals a pickled numpy array needs. Anything else (os.system, builtins.eval, ...)
# is refused: a .pkl from the internet must not be able to run code.
_SAFE_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An Unpickler that builds numpy arrays and nothing else."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_PICKLE_GLOBALS:
            raise DatasetError(self._path, "pickle", "only numpy array globals (ndarray, dtype, _reconstruct, scalar)",
                               f"refused global {module}.{name}")
        if module.startswith("numpy.core"):  # numpy 2 keeps numpy.core only as a deprecated alias
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def load_word_vectors(path: str | Path) -> np.ndarray:
    """Attribute word vectors (D, G) float32 from .pkl (numpy arrays only), .npy or .txt."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "file", _WORD_VECTOR_HELP, "no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pkl":
            with open(path, "rb") as f:
                arr = _ArrayUnpickler(f, path).load()
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".txt":
            arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
        else:
            raise DatasetError(path, "suffix", "one of .pkl, .npy, .txt", repr(path.suffix))
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise DatasetError(path, "file", _WORD_VECTOR_HELP, f"{type(e).__name__}: {e}") from None
    if not isinstance(arr, np.ndarray):
        raise DatasetError(path, "content", "a numpy array", type(arr).__name__)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DatasetError(path, "shape", "(D, G): one row per attribute", tuple(arr.shape))
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DatasetError(path, "dtype", "real numbers", arr.dtype)
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise DatasetError(path, "values", "finite values", f"{n_bad} NaN/inf entries")
    return arr.astype(np.float32)


def _mat_strings(path: Path, field: str, cell: np.ndarray) -> tuple[str, ...]:
    """A MATLAB cell array of strings (any shape) as a tuple of str."""
    out = []
    for item in np.asarray(cell, dtype=object).ravel():
        a = np.asarray(item).ravel()
        if a.size != 1 or not isinstance(a[0], str):
            raise DatasetError(path, field, "a cell array of strings", repr(item)[:60])
        out.append(str(a[0]))
    return tuple(out)


@dataclass(frozen=True)
class AttSplits:
    """The content of one xlsa17 att_splits.mat, with K classes and D attributes."""

    att: np.ndarray  # (K, D) float64, columns of the file (per-class L2-normalised)
    original_att: np.ndarray  # (K, D) float64 raw values (AWA2: -1 marks a missing value)
    class_names: tuple[str, ...]  # (K,)
    locs: dict[str, np.ndarray]  # LOC_FIELDS -> 0-based int64 image indices (train/val_loc may be absent)
    derived: tuple[str, ...] = ()  # fields the file lacked and that were derived (warned about)


def load_att_splits(path: str | Path) -> AttSplits:
    """Read and check an xlsa17 att_splits.mat (att and original_att are D x K there).

    Required: att and the three Proposed Split locations. Copies that circulate without
    original_att (raw values taken from att), allclasses_names (names from an allclasses.txt
    beside the file, else class_000...) or train_loc/val_loc (a seeded class split of trainval,
    made once the labels are known: `complete_class_split`) are accepted with a
    DerivedFieldWarning that says what was derived.
    """
    import scipy.io  # scipy (heavy): only the .mat readers need it

    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "file", "an xlsa17 att_splits.mat", "no such file")
    try:
        mat = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DatasetError(path, "file", "a MATLAB v5 file readable by scipy.io.loadmat", f"{type(e).__name__}: {e}") from None
    missing = [k for k in ("att", *REQUIRED_LOC_FIELDS) if k not in mat]
    if missing:
        raise DatasetError(path, "keys", f"att and {list(REQUIRED_LOC_FIELDS)} (train_loc/val_loc, original_att and "
                           "allclasses_names may be derived)", f"missing {missing}")
    split_fields = [k for k in CLASS_SPLIT_FIELDS if k in mat]
    if len(split_fields) == 1:
        raise DatasetError(path, "keys", "both train_loc and val_loc, or neither (then a class split is derived)",
                           f"only {split_fields[0]}")
    att = np.asarray(mat["att"])
    if att.ndim != 2 or not np.issubdtype(att.dtype, np.number):
        raise DatasetError(path, "att", "a numeric D x K matrix", f"{att.dtype} {att.shape}")
    d, k = att.shape
    derived: list[str] = []
    if "original_att" in mat:
        original = np.asarray(mat["original_att"])
        if original.shape != (d, k) or not np.issubdtype(original.dtype, np.number):
            raise DatasetError(path, "original_att", f"a numeric D x K = {d} x {k} matrix like att", f"{original.dtype} {original.shape}")
    else:
        original = att
        derived.append("original_att")
        warnings.warn(f"{path}: no original_att; the raw attribute values are taken from att (per-class "
                      "L2-normalised), so attributes_raw and the semi-synthetic generator see normalised values",
                      DerivedFieldWarning, stacklevel=2)
    for field, arr in (("att", att), ("original_att", original)):
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if n_bad:
            raise DatasetError(path, field, "finite values", f"{n_bad} NaN/inf entries")
    if "allclasses_names" in mat:
        names = _mat_strings(path, "allclasses_names", mat["allclasses_names"])
        if len(names) != k:
            raise DatasetError(path, "allclasses_names", f"{k} names (columns of att)", len(names))
    else:
        names = _derived_class_names(path, k)
        derived.append("allclasses_names")
    locs = {}
    for field in (*REQUIRED_LOC_FIELDS, *split_fields):
        raw = np.asarray(mat[field])
        if raw.size == 0 or not np.issubdtype(raw.dtype, np.number) or raw.ndim > 2 or (raw.ndim == 2 and min(raw.shape) != 1):
            raise DatasetError(path, field, "a non-empty N x 1 vector of 1-based image indices", f"{raw.dtype} {raw.shape}")
        loc = raw.ravel()
        if np.issubdtype(loc.dtype, np.floating) and not np.all(loc == np.round(loc)):
            raise DatasetError(path, field, "integer image indices", "fractional values")
        loc = loc.astype(np.int64)
        if loc.min() < 1:
            raise DatasetError(path, field, "1-based image indices (>= 1)", int(loc.min()))
        if np.unique(loc).size != loc.size:
            raise DatasetError(path, field, "distinct image indices", "duplicates")
        locs[field] = loc - 1
    check_disjoint_locations(locs, path)  # before any label is read: a leak is the file's, not the labels'
    if not split_fields:
        derived.extend(CLASS_SPLIT_FIELDS)
    return AttSplits(att=att.T.astype(np.float64), original_att=original.T.astype(np.float64), class_names=names,
                     locs=locs, derived=tuple(derived))


def _indices(locs: np.ndarray, limit: int = 5) -> str:
    """0-based image indices as the file writes them: "1-based indices [1, 3, ...]" (sorted, the first few)."""
    locs = np.sort(np.asarray(locs))
    return f"1-based indices {(locs[:limit] + 1).tolist()}{' ...' if locs.size > limit else ''}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_disjoint_locations(locs: Mapping[str, np.ndarray], origin: str | Path) -> None:
    """DatasetError naming `origin` (att_splits.mat), two fields of DISJOINT_LOCS that share images and where.

    locs: field -> 0-based image indices; pairs with a field absent (train_loc/val_loc not yet
    derived) are skipped.
    """
    for (a, b), why in DISJOINT_LOCS.items():
        if a in locs and b in locs:
            both = np.intersect1d(locs[a], locs[b])
            if both.size:
                raise DatasetError(origin, f"{a} and {b}", f"no image in both ({why})",
                                   f"{_plural(both.size, 'image')} in both, at {_indices(both)}")


def _class_list(ids: np.ndarray, names: tuple[str, ...], limit: int = 5) -> str:
    ids = np.asarray(ids)
    shown = ", ".join(f"{int(c)} ({names[int(c)]})" for c in ids[:limit])
    return shown + (f", ... ({ids.size} in all)" if ids.size > limit else "")


def check_split_sides(locs: Mapping[str, np.ndarray], labels: np.ndarray, class_names: tuple[str, ...],
                      origin: str | Path, where: str | Path) -> None:
    """DatasetError, named against `origin` (att_splits.mat), unless every location's image is of its split's side.

    labels (N,) 0-based, from `where` (named in the message too: the labels or the locations may be
    the wrong ones). Seen classes are those of trainval_loc's images: test_seen_loc, train_loc and
    val_loc hold only them, test_unseen_loc none of them, train_loc and val_loc disjoint classes.
    train_loc/val_loc are checked when present (a derived class split is right by construction).
    """
    labels = np.asarray(labels)
    k = len(class_names)
    by = f"by the labels of {where}"
    tv, tu = np.asarray(locs["trainval_loc"]), np.asarray(locs["test_unseen_loc"])
    seen = np.unique(labels[tv])
    both = np.intersect1d(seen, labels[tu])
    if both.size:
        c = int(both[0])
        in_tv, in_tu = tv[labels[tv] == c], tu[labels[tu] == c]
        more = f"; {_plural(both.size - 1, 'more class')} like it" if both.size > 1 else ""
        raise DatasetError(origin, "test_unseen_loc", f"images of unseen classes only, i.e. of classes without a "
                           f"trainval_loc image ({by})",
                           f"class {_class_list(both[:1], class_names)} has {_plural(in_tv.size, 'image')} in "
                           f"trainval_loc ({_indices(in_tv)}) and {in_tu.size} in test_unseen_loc ({_indices(in_tu)})"
                           f"{more}")
    neither = np.setdiff1d(np.arange(k), np.union1d(seen, labels[tu]))
    if neither.size:
        raise DatasetError(origin, "trainval_loc and test_unseen_loc", f"images of every one of the {k} classes "
                           f"(columns of att) in one of them ({by})",
                           f"{_plural(neither.size, 'class')} in neither: {_class_list(neither, class_names)}")
    for field in ("test_seen_loc", *(f for f in CLASS_SPLIT_FIELDS if f in locs)):
        loc = np.asarray(locs[field])
        out = loc[~np.isin(labels[loc], seen)]
        if out.size:
            raise DatasetError(origin, field, f"images of seen classes only, i.e. of classes with trainval_loc "
                               f"images ({by})", f"{_plural(out.size, 'image')} of other classes, at {_indices(out)} "
                               f"({'class' if np.unique(labels[out]).size == 1 else 'classes'} "
                               f"{_class_list(np.unique(labels[out]), class_names)})")
    both = np.intersect1d(labels[locs["train_loc"]], labels[locs["val_loc"]]) if "val_loc" in locs else []
    if len(both):
        raise DatasetError(origin, "train_loc and val_loc", f"images of disjoint classes (val_loc's classes are "
                           f"unseen while selecting; {by})",
                           f"{_plural(len(both), 'class')} in both: {_class_list(both, class_names)}")


def _derived_class_names(path: Path, k: int) -> tuple[str, ...]:
    """Class names for a file without allclasses_names: allclasses.txt beside it (xlsa17 ships one), else class_000..."""
    listing = path.parent / "allclasses.txt"
    if listing.is_file():
        names = tuple(ln.strip() for ln in listing.read_text().splitlines() if ln.strip())
        if len(names) != k:
            raise DatasetError(listing, "class names", f"{k} names, one per line (columns of att in {path.name})", len(names))
        warnings.warn(f"{path}: no allclasses_names; class names taken from {listing}", DerivedFieldWarning, stacklevel=3)
        return names
    warnings.warn(f"{path}: no allclasses_names and no allclasses.txt beside it; classes are named class_000 to "
                  f"class_{k - 1:03d} in att column order", DerivedFieldWarning, stacklevel=3)
    return tuple(f"class_{i:03d}" for i in range(k))


def complete_class_split(locs: Mapping[str, np.ndarray], labels: np.ndarray, seed: int, origin: str) -> dict[str, np.ndarray]:
    """`locs` with train_loc/val_loc; when the file had none, a seeded class split of the trainval classes.

    round(VAL_CLASS_FRACTION x seen) classes (at least 1, at most all but 1), drawn with `seed`,
    become validation classes (val_loc: their trainval images); the others are train classes
    (train_loc: theirs). The same labels and seed give the same split.
    """
    out = {f: np.asarray(v, dtype=np.int64) for f, v in locs.items()}
    if all(f in out for f in CLASS_SPLIT_FIELDS):
        return out
    labels = np.asarray(labels)
    trainval = out["trainval_loc"]
    if trainval.max() >= labels.shape[0]:
        raise DatasetError(origin, "labels", f"at least {int(trainval.max()) + 1} images (trainval_loc)", labels.shape[0])
    seen = np.unique(labels[trainval])
    if seen.size < 2:
        raise DatasetError(origin, "trainval_loc", "images of at least 2 classes to derive a train/val class split", seen.size)
    n_val = min(max(1, int(round(VAL_CLASS_FRACTION * seen.size))), seen.size - 1)
    val_classes = np.sort(np.random.default_rng(seed).choice(seen, size=n_val, replace=False))
    in_val = np.isin(labels[trainval], val_classes)
    out["train_loc"], out["val_loc"] = trainval[~in_val], trainval[in_val]
    warnings.warn(f"{origin}: no train_loc/val_loc; validation classes drawn from the {seen.size} trainval classes "
                  f"with seed {seed}: {n_val} validation classes ({int(in_val.sum())} images), {seen.size - n_val} "
                  f"train classes", DerivedFieldWarning, stacklevel=2)
    return out


def load_attribute_names(dataset_dir: str | Path | None, name: str, num_attributes: int) -> tuple[str, ...]:
    """Attribute names from CUB attributes.txt, AWA2 predicates.txt or SUN attributes.mat; else attr_000..."""
    fallback = tuple(f"attr_{i:03d}" for i in range(num_attributes))
    if dataset_dir is None:
        return fallback
    d = Path(dataset_dir)
    names: tuple[str, ...] | None = None
    for candidate in (d / "attributes.txt", d / "predicates.txt"):
        if candidate.is_file():
            # "index<whitespace>name" per line (CUB: "1 has_bill_shape::dagger", AWA2: "1\tblack").
            lines = [ln.split(maxsplit=1) for ln in candidate.read_text().splitlines() if ln.strip()]
            names = tuple(parts[-1].strip() for parts in lines)
            where = candidate
            break
    else:
        if (d / "attributes.mat").is_file():
            import scipy.io  # scipy (heavy): only the .mat readers need it

            where = d / "attributes.mat"
            mat = scipy.io.loadmat(where)
            if "attributes" not in mat:
                raise DatasetError(where, "keys", "an `attributes` cell array of names", f"keys {sorted(k for k in mat if not k.startswith('__'))}")
            names = _mat_strings(where, "attributes", mat["attributes"])
    if names is None:
        return fallback
    if len(names) != num_attributes:
        raise DatasetError(where, "attribute names", f"{num_attributes} names (rows of att in att_splits.mat) for {name}", len(names))
    return names


def load_image_labels(path: str | Path) -> np.ndarray:
    """The 0-based class of every image (res101.mat order) from an image_labels.npz."""
    path = Path(path)
    help_ = IMAGE_LABELS_HELP.format(out=path)
    if not path.is_file():
        raise DatasetError(path, "file", help_, "no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "labels" not in z.files:
                raise DatasetError(path, "keys", help_, f"keys {z.files}")
            labels = z["labels"]
    except (OSError, ValueError) as e:
        raise DatasetError(path, "file", f"{help_} (a numpy .npz without pickles)", f"{type(e).__name__}: {e}") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(path, "labels", "a 1-D integer array (the 0-based class of every image)",
                           f"{labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def load_res101(path: Path, variables: tuple[str, ...]) -> dict[str, Any]:
    """The named variables of an xlsa17 res101.mat (missing ones absent), or one DatasetError naming the file."""
    import scipy.io  # scipy (heavy): only the .mat readers need it

    if not path.is_file():
        raise DatasetError(path, "file", "an xlsa17 res101.mat", "no such file")
    try:
        return scipy.io.loadmat(path, variable_names=variables)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DatasetError(path, "file", "a MATLAB v5 file readable by scipy.io.loadmat", f"{type(e).__name__}: {e}") from None


def image_labels_arrays(res101: str | Path, att_splits: str | Path,
                        strip_prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays of an image_labels.npz (IMAGE_LABELS_HELP) from xlsa17's res101.mat and att_splits.mat.

    Reads only res101.mat's `labels` (N x 1, 1-based) and `image_files` (N x 1 cell of paths,
    optional), not its features. The labels and locations pass the same checks as a conversion's
    (disjoint locations, every image on its split's side). strip_prefix: removed from the start
    of every image path that has it (xlsa17's are the authors' absolute paths).
    """
    path = Path(res101)
    mat = load_res101(path, ("labels", "image_files"))
    if "labels" not in mat:
        raise DatasetError(path, "keys", "labels (N x 1, 1-based) and optionally image_files", "no labels")
    raw = np.asarray(mat["labels"]).ravel()
    if raw.size == 0 or not np.issubdtype(raw.dtype, np.number) or not np.all(raw == np.round(raw)):
        raise DatasetError(path, "labels", "integer 1-based class ids, one per image", f"{raw.dtype} {raw.shape}")
    splits = load_att_splits(att_splits)
    k = len(splits.class_names)
    if raw.min() < 1 or raw.max() > k:
        hint = " (labels look 0-based)" if raw.min() == 0 else ""
        raise DatasetError(path, "labels", f"1-based class ids in [1, {k}] ({att_splits} has K={k}){hint}",
                           f"range [{raw.min()}, {raw.max()}]")
    labels = raw.astype(np.int64) - 1
    n = labels.size
    for field, loc in splits.locs.items():
        if loc.max() >= n:
            raise DatasetError(path, "labels", f"at least {int(loc.max()) + 1} images ({field} of {att_splits})", n)
    check_split_sides(splits.locs, labels, splits.class_names, att_splits, path)
    out = {
        "labels": labels,
        **{f: splits.locs[f] for f in REQUIRED_LOC_FIELDS},
        "seenclasses": np.unique(labels[splits.locs["trainval_loc"]]),
        "unseenclasses": np.unique(labels[splits.locs["test_unseen_loc"]]),
    }
    if "image_files" in mat:
        files = _mat_strings(path, "image_files", mat["image_files"])
        if len(files) != n:
            raise DatasetError(path, "image_files", f"{n} paths (one per label)", len(files))
        out["image_files"] = np.array([f[len(strip_prefix):] if strip_prefix and f.startswith(strip_prefix) else f
                                       for f in files], dtype=str)
    return out


def write_image_labels(res101: str | Path, att_splits: str | Path, out: str | Path, strip_prefix: str = "") -> Path:
    """Write `image_labels_arrays` to `out` (an .npz) via a temporary name and a rename; returns `out`."""
    arrays = image_labels_arrays(res101, att_splits, strip_prefix)  # every check before anything is written
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
            np.savez(f, **arrays)
    return Path(out)


@dataclass(frozen=True)
class ClassSideSource:
    """The published class side of one dataset, before it becomes a `ClassSide`.

    K classes, D attributes, G word-vector dimensions, N images (res101.mat order).
    """

    name: str
    class_names: tuple[str, ...]  # (K,)
    attribute_names: tuple[str, ...]  # (D,)
    att: np.ndarray  # (K, D) float64, xlsa17 `att` transposed
    original_att: np.ndarray  # (K, D) float64, xlsa17 `original_att` transposed (raw)
    word_vectors: np.ndarray  # (D, G) float32
    locs: dict[str, np.ndarray]  # LOC_FIELDS -> 0-based int64 image indices
    labels: np.ndarray | None  # (N,) int64 0-based class per image; None when the features bring them
    origin: str  # where it was read from, for messages

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    def with_labels(self, labels: np.ndarray, where: str, seed: int = 0) -> "ClassSideSource":
        """This source with per-image labels: the class split completed (`complete_class_split`), all checked."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(where, "labels", "a 1-D integer array", f"{labels.dtype} {labels.shape}")
        src = replace(self, labels=labels.astype(np.int64), locs=complete_class_split(self.locs, labels, seed, self.origin))
        src.check_labels(src.labels, where)  # type: ignore[arg-type]
        return src

    def check_labels(self, labels: np.ndarray, where: str) -> None:
        """DatasetError unless `labels` (N,) fit the classes and the xlsa17 locations of this source."""
        labels = np.asarray(labels)
        k = self.num_classes
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(where, "labels", "a 1-D integer array", f"{labels.dtype} {labels.shape}")
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.size:
            hint = " (labels look 1-based: subtract 1)" if labels.min() >= 1 and labels.max() == k else ""
            raise DatasetError(where, "labels", f"0-based class ids in [0, {k}) ({self.origin} has K={k}){hint}",
                               f"{bad.size} outside, e.g. {bad[:5].tolist()}")
        n = labels.shape[0]
        for field, loc in self.locs.items():
            if loc.max() >= n:
                raise DatasetError(where, "labels", f"at least {int(loc.max()) + 1} images ({field} of {self.origin})", n)
        # locations first: two splits sharing an image is the locations' fault, whatever the labels say
        check_disjoint_locations(self.locs, self.origin)
        check_split_sides(self.locs, labels, self.class_names, self.origin, where)


def load_xlsa17(name: str, att_splits: str | Path, word_vectors: str | Path,
                dataset_dir: str | Path | None = None, labels: np.ndarray | None = None, seed: int = 0,
                labels_origin: str | Path | None = None) -> ClassSideSource:
    """A source from the individual files: att_splits.mat, a word-vector file, optional names and labels.

    seed: of the class split derived for a file without train_loc/val_loc (see `complete_class_split`).
    labels_origin: the file the labels came from, for messages (default: dataset_dir or att_splits).
    """
    splits = load_att_splits(att_splits)
    wv = load_word_vectors(word_vectors)
    d = splits.att.shape[1]
    if wv.shape[0] != d:
        raise DatasetError(word_vectors, "shape", f"({d}, G): one row per attribute of {Path(att_splits).name}", tuple(wv.shape))
    src = ClassSideSource(
        name=name, class_names=splits.class_names,
        attribute_names=load_attribute_names(dataset_dir, name, d),
        att=splits.att, original_att=splits.original_att, word_vectors=wv, locs=splits.locs,
        labels=None, origin=str(att_splits),
    )
    return src if labels is None else src.with_labels(labels, str(labels_origin or dataset_dir or att_splits), seed)


def _find_word_vectors(source_dir: Path, name: str) -> Path:
    for suffix in (".pkl", ".npy", ".txt"):
        p = source_dir / f"{name}_attribute{suffix}"
        if p.is_file():
            return p
    return source_dir / f"{name}_attribute.pkl"  # load_word_vectors explains what is missing


def load_source(name: str, source_dir: str | Path | None = None, word_vectors: str | Path | None = None,
                seed: int = 0) -> ClassSideSource:
    """The class side of `name` from a shared-style folder, or from the packaged asset when source_dir is None."""
    if source_dir is None:
        return load_asset(name)
    d = Path(source_dir)
    if not d.is_dir():
        raise DatasetError(d, "source_dir", f"a folder with att_splits.mat, {name}_attribute.pkl, image_labels.npz", "no such folder")
    labels = load_image_labels(d / "image_labels.npz")
    return load_xlsa17(name, d / "att_splits.mat", word_vectors or _find_word_vectors(d, name), d, labels, seed,
                       labels_origin=d / "image_labels.npz")


# ---------------------------------------------------------------- packaged assets

def asset_path(name: str) -> Path:
    return ASSET_DIR / f"{name}.npz"


def source_to_arrays(src: ClassSideSource) -> dict[str, np.ndarray]:
    """The plain arrays of a packaged asset (strings as fixed-width unicode, no object arrays)."""
    if src.labels is None:
        raise DatasetError(src.origin, "labels", "per-image labels to package", "none")
    n = src.labels.shape[0]
    loc_dtype = np.int32 if n < 2**31 else np.int64
    return {
        "name": np.array(src.name),
        "class_names": np.array(src.class_names, dtype=str),
        "attribute_names": np.array(src.attribute_names, dtype=str),
        "att": src.att.astype(np.float64),
        "original_att": src.original_att.astype(np.float64),
        "word_vectors": src.word_vectors.astype(np.float32),
        "labels": src.labels.astype(np.int16 if src.num_classes < 2**15 else np.int32),
        **{f: src.locs[f].astype(loc_dtype) for f in LOC_FIELDS},
    }


def load_asset(name: str, path: str | Path | None = None) -> ClassSideSource:
    """A source from a packaged npz asset (default dedn/data/assets/<name>.npz)."""
    p = Path(path) if path is not None else asset_path(name)
    if not p.is_file():
        known = sorted(q.stem for q in ASSET_DIR.glob("*.npz"))
        raise DatasetError(p, "file", f"a packaged class side (one of {known}) or a source folder with the xlsa17 files", "no such file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DatasetError(p, "file", "an npz written by tools/pack_assets.py", f"{type(e).__name__}: {e}") from None
    required = ("class_names", "attribute_names", "att", "original_att", "word_vectors", "labels", *LOC_FIELDS)
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetError(p, "arrays", f"all of {list(required)}", f"missing {missing}")
    src = ClassSideSource(
        name=str(arrays["name"]) if "name" in arrays else name,
        class_names=tuple(str(s) for s in arrays["class_names"]),
        attribute_names=tuple(str(s) for s in arrays["attribute_names"]),
        att=arrays["att"].astype(np.float64), original_att=arrays["original_att"].astype(np.float64),
        word_vectors=arrays["word_vectors"].astype(np.float32),
        locs={f: arrays[f].astype(np.int64) for f in LOC_FIELDS},
        labels=arrays["labels"].astype(np.int64), origin=str(p),
    )
    k, d = src.att.shape
    if (len(src.class_names), len(src.attribute_names)) != (k, d) or src.word_vectors.shape[0] != d:
        raise DatasetError(p, "shapes", f"class_names K={k}, attribute_names and word_vectors rows D={d}",
                           f"{len(src.class_names)}, {len(src.attribute_names)}, {src.word_vectors.shape}")
    src.check_labels(src.labels, str(p))  # type: ignore[arg-type]
    return src


# ---------------------------------------------------------------- class side and splits

def class_ids(src: ClassSideSource, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """seen/unseen/train/val class ids (sorted int64) from the xlsa17 locations."""
    labels = src.labels if labels is None else np.asarray(labels)
    if labels is None:
        raise DatasetError(src.origin, "labels", "per-image labels to derive the class splits", "none")
    of = lambda field: np.unique(labels[src.locs[field]]).astype(np.int64)  # noqa: E731
    return {"seen_classes": of("trainval_loc"), "unseen_classes": of("test_unseen_loc"),
            "train_classes": of("train_loc"), "val_classes": of("val_loc")}


def build_class_side(src: ClassSideSource, clusters: Mapping[str, Mapping[str, list[int]]] | None = None,
                     labels: np.ndarray | None = None) -> ClassSide:
    """The ClassSide of a source.

    attributes_raw = original_att as the file has it, except a dataset's documented missing-value
    marks (MISSING_VALUE_MARKS: AWA1/AWA2's exactly -1), which become 0, with a warning;
    attributes = row-L2-normalised att (K, D) float32. clusters default to "manual" and "halved"
    for CUB/SUN/AWA2 and to nothing for other datasets.
    """
    raw = src.original_att.astype(np.float64)  # a copy: the source keeps the file's values
    mark = MISSING_VALUE_MARKS.get(src.name.upper())
    if mark is not None:
        missing = raw == mark
        if missing.any():
            # the message keeps "negative values" (filters in demo.py and tests/conftest.py match it)
            warnings.warn(f"{src.origin}: original_att holds {int(missing.sum())} negative values that are "
                          f"{src.name}'s missing-value marks (exactly {mark:g}); set to 0 in attributes_raw",
                          stacklevel=2)
            raw[missing] = 0.0
    if clusters is None:
        clusters = default_clusters(src.name, src.num_attributes)
    return ClassSide(
        name=src.name, class_names=tuple(src.class_names), attribute_names=tuple(src.attribute_names),
        attributes_raw=raw, attributes=normalize_rows(src.att), word_vectors=src.word_vectors.astype(np.float32),
        clusters={s: {str(n): [int(a) for a in ids] for n, ids in c.items()} for s, c in clusters.items()},
        **class_ids(src, labels),
    )


# How each split is made from att_splits.mat, for the message about an empty one.
_SPLIT_RECIPE = {
    "trainval": "trainval = trainval_loc", "test_seen": "test_seen = test_seen_loc",
    "test_unseen": "test_unseen = test_unseen_loc",
    "train": "train = train_loc's trainval_loc images less those drawn for val_seen",
    "val_seen": f"val_seen = round({VAL_SEEN_FRACTION:.0%}) of each class's trainval_loc images in train_loc; "
                "a class with a single one keeps it in train",
    "val_unseen": "val_unseen = val_loc's trainval_loc images (its test_seen_loc images are left out)",
}


def make_splits(labels: np.ndarray, locs: Mapping[str, np.ndarray], seed: int = 0,
                origin: str | Path = "att_splits.mat") -> dict[str, np.ndarray]:
    """Image indices of the six splits (docs/design.md#dataset-directory-schema_version-1): xlsa17 trainval/test_*; train/val_seen from train_loc; val_unseen = val_loc.

    xlsa17's train_loc and val_loc predate the Proposed Split and together cover every
    seen-class image, test_seen included (CUB: 5875 + 2946 = 7057 trainval + 1764 test_seen).
    Selection must never see the test split, so test_seen images are removed from train,
    val_seen and val_unseen: all three are drawn from trainval only.

    train_loc is split per class: round(20 %) of each class's images (at least 1, at most all
    but 1 when the class has two or more) go to val_seen, drawn by a generator seeded with
    `seed`, so every train class has images in both. Indices come back sorted.

    DatasetError naming `origin` (the att_splits.mat the locations came from) when a split would
    be empty or two splits would share an image (format.DISJOINT_SPLITS).
    """
    labels = np.asarray(labels)
    trainval = np.asarray(locs["trainval_loc"], dtype=np.int64)
    in_trainval = np.isin(np.asarray(locs["train_loc"], dtype=np.int64), trainval)
    train_loc = np.asarray(locs["train_loc"], dtype=np.int64)[in_trainval]
    val_loc = np.asarray(locs["val_loc"], dtype=np.int64)
    val_loc = val_loc[np.isin(val_loc, trainval)]
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(train_loc.shape[0], dtype=bool)
    loc_labels = labels[train_loc]
    for k in np.unique(loc_labels):
        members = np.flatnonzero(loc_labels == k)
        n = members.size
        if n < 2:
            continue  # a single image cannot be in both; it trains
        n_val = min(max(1, int(round(VAL_SEEN_FRACTION * n))), n - 1)
        val_mask[rng.choice(members, size=n_val, replace=False)] = True
    out = {
        "trainval": locs["trainval_loc"], "test_seen": locs["test_seen_loc"], "test_unseen": locs["test_unseen_loc"],
        "train": train_loc[~val_mask], "val_seen": train_loc[val_mask], "val_unseen": val_loc,
    }
    out = {s: np.sort(np.asarray(v, dtype=np.int64)) for s, v in out.items()}
    for split, ids in out.items():
        if ids.size == 0:  # an empty split trains or scores on nothing, and the run would still exit 0
            detail = {
                "train": f"{_plural(in_trainval.size, 'train_loc image')}, {int(in_trainval.sum())} of them in "
                         "trainval_loc",
                "val_seen": f"each of the {np.unique(loc_labels).size} train_loc classes has a single trainval_loc "
                            "image",
                "val_unseen": f"{_plural(np.asarray(locs['val_loc']).size, 'val_loc image')}, none in trainval_loc",
            }.get(split, f"an empty {split}_loc")
            raise DatasetError(origin, f"splits.{split}", f"at least one image in every split ({_SPLIT_RECIPE[split]})",
                               f"none: {detail}")
    found = shared_ids(out)  # reached only when the locations bypassed the file checks (a direct call)
    if found is not None:
        a, b, both = found
        raise DatasetError(origin, f"splits.{a} and splits.{b}", f"no image in both ({DISJOINT_SPLITS[(a, b)]})",
                           f"{_plural(both.size, 'image')} in both, at {_indices(both)}")
    return out
