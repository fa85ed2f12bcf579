"""Class-side data of a dataset: class attributes, attribute word vectors, class splits, attribute clusters."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClassSide:
    """Everything about classes and attributes; no image features.

    Shapes: K classes, D attributes, G word-vector dimensions. Class ids are 0-based.
    """

    name: str
    class_names: tuple[str, ...]  # (K,)
    attribute_names: tuple[str, ...]  # (D,)
    attributes_raw: np.ndarray  # (K, D) as given by the source (only AWA1/AWA2's -1 missing-value marks set to 0)
    attributes: np.ndarray  # (K, D) float32, row-L2-normalised: the A the model uses
    word_vectors: np.ndarray  # (D, G) float32, as given (the model normalises rows at init)
    seen_classes: np.ndarray  # int64, classes of trainval
    unseen_classes: np.ndarray  # int64, classes of test_unseen
    train_classes: np.ndarray  # int64, classes of xlsa17 train_loc (subset of seen)
    val_classes: np.ndarray  # int64, classes of xlsa17 val_loc (subset of seen, disjoint from train)
    # scheme -> {cluster name -> attribute ids}; e.g. {"manual": {"head": [...], ...}, "halved": {...}}
    clusters: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    @property
    def word_dim(self) -> int:
        return int(self.word_vectors.shape[1])


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; all-zero rows stay zero (SUN has one such word vector)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)
