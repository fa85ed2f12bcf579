"""A small image tree for the real CUB class side, as xlsa17 describes it (tests of `from-images`).

`make_cub_image_tree` picks two trainval images per seen class and one test image per class
of ../shared/data/CUB/image_labels.npz, writes them under `root` with their real relative paths
(odd sizes; modes RGB, L, P, RGBA, CMYK; a colour per class so classes can be told apart), and a
res101.mat (labels, image_files under a foreign absolute prefix, as xlsa17's name the authors' machine)
and an att_splits.mat (the real class side, the locations re-indexed to the chosen images) that describe
exactly those images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODES = ("RGB", "L", "P", "RGBA", "CMYK")


@dataclass(frozen=True)
class ImageTree:
    images: Path  # the image root
    res101: Path
    att_splits: Path
    word_vectors: Path
    files: list[str]  # relative to `images`, res101 order
    prefix: str  # what res101.mat's image_files have before `files` (from-images strips it)
    labels: np.ndarray  # 0-based


def _pick(locs: dict[str, np.ndarray], labels: np.ndarray, train_or_val: np.ndarray) -> np.ndarray:
    """Two trainval images per seen class (val_seen takes one of a train class's), one test image per class."""
    chosen = []
    for field, per_class in (("trainval_loc", 2), ("test_seen_loc", 1), ("test_unseen_loc", 1)):
        loc = np.sort(locs[field])
        if field == "trainval_loc":  # images that also route to train or val_seen
            loc = loc[np.isin(loc, train_or_val)]
        for _ in range(per_class):
            _, first = np.unique(labels[loc], return_index=True)
            chosen.append(loc[first])
            loc = np.delete(loc, first)
    return np.unique(np.concatenate(chosen))


def _image(label: int, i: int, rng: np.random.Generator):
    from PIL import Image

    w, h = int(rng.integers(33, 97)), int(rng.integers(33, 97))
    colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float64)
    px = np.clip(colour + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(px, "RGB")
    mode = MODES[i % len(MODES)]
    if mode == "P":
        return img.convert("P", palette=Image.ADAPTIVE), "PNG"
    if mode == "RGBA":
        return img.convert("RGBA"), "PNG"
    return img.convert(mode), "JPEG"


def make_cub_image_tree(source: Path, root: Path, seed: int = 0) -> ImageTree:
    import scipy.io

    # xlsa17's paths start with a folder of the authors' machine that no user has; a folder that does
    # not exist here stands in for it
    prefix = f"{root.parent / 'xlsa17-authors-machine' / 'CUB_200_2011'}/"

    z = np.load(source / "image_labels.npz")
    labels_all = z["labels"].astype(np.int64)
    mat = scipy.io.loadmat(source / "att_splits.mat")
    one_based = {f: np.asarray(mat[f]).ravel().astype(np.int64) for f in
                 ("trainval_loc", "test_seen_loc", "test_unseen_loc", "train_loc", "val_loc")}
    locs = {f: v - 1 for f, v in one_based.items()}
    chosen = _pick(locs, labels_all, np.union1d(locs["train_loc"], locs["val_loc"]))
    position = {int(old): new for new, old in enumerate(chosen)}
    for f, loc in locs.items():
        mat[f] = np.array([[position[int(i)] + 1] for i in np.sort(loc) if int(i) in position], np.int64)
    files = [str(z["image_files"][i]) for i in chosen]
    labels = labels_all[chosen]
    images = root / "images"
    rng = np.random.default_rng(seed)
    for i, (rel, label) in enumerate(zip(files, labels)):
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img, fmt = _image(int(label), i, rng)
        img.save(path, format=fmt)
    cells = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        cells[i, 0] = np.array([prefix + f])
    res101 = root / "res101.mat"
    scipy.io.savemat(res101, {"image_files": cells, "labels": (labels + 1).reshape(-1, 1).astype(np.float64)})
    att = root / "att_splits.mat"
    scipy.io.savemat(att, {k: v for k, v in mat.items() if not k.startswith("__")})
    wv = root / "CUB_attribute.pkl"
    wv.write_bytes((source / "CUB_attribute.pkl").read_bytes())
    return ImageTree(images, res101, att, wv, files, prefix, labels)
