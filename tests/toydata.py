"""Shared test helpers: a toy dataset (K=8, D=12, 4 manual clusters) and loading a job script as a module."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from dedn.data.class_side import ClassSide, normalize_rows
from dedn.data import SPLITS, DatasetWriter, split_classes

ROOT = Path(__file__).resolve().parents[1]
TOY_SHAPE = (6, 3, 4)  # C, H, W: H != W so that grid orientation mistakes show


# ---- a toy dataset (K=8, D=12, 4 manual clusters) -------------------------------------------
def toy_class_side(seed: int = 0) -> ClassSide:
    """K=8 classes (seen 0-5, unseen 6-7; train 0-3, val 4-5), D=12 attributes in 4 manual clusters, G=6."""
    rng = np.random.default_rng(seed)
    raw = rng.random((8, 12)) * 100
    return ClassSide(
        name="TOY", class_names=tuple(f"class{i}" for i in range(8)),
        attribute_names=tuple(f"attr{i}" for i in range(12)), attributes_raw=raw, attributes=normalize_rows(raw),
        word_vectors=rng.standard_normal((12, 6)).astype(np.float32),
        seen_classes=np.arange(6), unseen_classes=np.array([6, 7]), train_classes=np.arange(4),
        val_classes=np.array([4, 5]),
        clusters={"manual": {"head": [0, 1, 2], "torso": [3, 4, 5], "wing": [6, 7, 8], "tail": [9, 10, 11]},
                  "halved": {"head+torso": [0, 1, 2, 3, 4, 5], "wing+tail": [6, 7, 8, 9, 10, 11]}},
    )


def write_toy_dataset(root: Path, per_class: int = 3, semi_synthetic: bool = True) -> Path:
    """All six splits, `per_class` rows per class, non-negative features with a class-dependent spot."""
    cs = toy_class_side()
    rng = np.random.default_rng(1)
    with DatasetWriter(root, class_side=cs, feature_shape=TOY_SHAPE, semi_synthetic=semi_synthetic) as w:
        for i, split in enumerate(SPLITS):
            labels = np.repeat(split_classes(cs, split), per_class)
            ids = 1000 * i + np.arange(labels.size, dtype=np.int64)
            feats = np.abs(rng.standard_normal((labels.size, *TOY_SHAPE))).astype(np.float32)
            feats[np.arange(labels.size), labels % 6, labels % 3, labels % 4] += 3.0
            with w.split(split) as s:
                s.add(ids, labels, feats)
    return root


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod
