"""A ridge-regression zero-shot baseline: pooled features -> class attributes -> nearest class (cosine).

Used to check that a (semi-synthetic) dataset is learnable but not trivial, and as a floor any
DEDN run must beat. Per-class mean top-1 accuracies as in docs/method.md#gzsl-metrics:
S on seen-split images and U on unseen-split images with argmax over seen ∪ unseen classes,
T on unseen-split images with argmax over unseen classes only, H = 2SU / (S + U). No calibration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow.parquet as pq

from dedn.data import FeatureDataset
from dedn.data.class_side import ClassSide, normalize_rows

# phase -> (training split, seen evaluation split, unseen evaluation split); mirrors dedn.protocol.PHASES.
BASELINE_PHASES = {"select": ("train", "val_seen", "val_unseen"), "final": ("trainval", "test_seen", "test_unseen")}


@dataclass(frozen=True)
class BaselineResult:
    """Accuracies in [0, 1] and their chance levels."""

    T: float
    U: float
    S: float
    H: float
    chance_T: float  # 1 / #unseen
    chance_gzsl: float  # 1 / (#seen + #unseen): S, U and H of a uniform guess
    num_train: int
    num_seen_test: int
    num_unseen_test: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}

    def __str__(self) -> str:
        return (f"T={100 * self.T:.1f}% U={100 * self.U:.1f}% S={100 * self.S:.1f}% H={100 * self.H:.1f}% "
                f"(chance T={100 * self.chance_T:.1f}%, S/U/H={100 * self.chance_gzsl:.2f}%; "
                f"{self.num_train} train, {self.num_seen_test}/{self.num_unseen_test} seen/unseen test images)")


def pool(features: np.ndarray) -> np.ndarray:
    """Mean over the grid: (n, C, H, W) -> (n, C) float64."""
    return np.asarray(features, dtype=np.float64).mean(axis=(2, 3))


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the fraction of their images predicted right."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    if classes.size == 0:
        return float("nan")
    hits = np.bincount(inverse, weights=(pred == labels).astype(np.float64), minlength=classes.size)
    return float(np.mean(hits / np.bincount(inverse, minlength=classes.size)))


def harmonic(s: float, u: float) -> float:
    return 0.0 if s + u == 0 else 2 * s * u / (s + u)


@dataclass(frozen=True)
class RidgeMap:
    """x (n, C) -> standardised -> x W + b (n, D)."""

    mean: np.ndarray  # (C,)
    scale: np.ndarray  # (C,)
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (D,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> RidgeMap:
    """Closed-form ridge on standardised inputs: W = (Z^T Z + alpha n I)^-1 Z^T (y - mean y); x (n, C), y (n, D)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    ybar = y.mean(0)
    gram = z.T @ z + alpha * x.shape[0] * np.eye(z.shape[1])
    weight = np.linalg.solve(gram, z.T @ (y - ybar))
    return RidgeMap(mean, scale, weight, ybar)


def class_scores(mapping: RidgeMap, x: np.ndarray, class_attributes: np.ndarray) -> np.ndarray:
    """Cosine similarity (n, K) of predicted attribute vectors to every class's attributes."""
    return normalize_rows(mapping(x)).astype(np.float64) @ normalize_rows(class_attributes).T.astype(np.float64)


def evaluate_baseline(train: tuple[np.ndarray, np.ndarray], seen_test: tuple[np.ndarray, np.ndarray],
                      unseen_test: tuple[np.ndarray, np.ndarray], class_side: ClassSide,
                      seen: np.ndarray, unseen: np.ndarray, alpha: float = 1.0) -> BaselineResult:
    """Fit on train = (pooled x (n, C), labels (n,)), score seen_test and unseen_test the same way."""
    a = np.asarray(class_side.attributes, dtype=np.float64)  # (K, D)
    x_tr, y_tr = train
    mapping = fit_ridge(x_tr, a[y_tr], alpha)
    seen, unseen = np.asarray(seen), np.asarray(unseen)
    active = np.union1d(seen, unseen)

    def argmax_over(x: np.ndarray, classes: np.ndarray) -> np.ndarray:
        return classes[np.argmax(class_scores(mapping, x, a[classes]), axis=1)]

    s = per_class_accuracy(argmax_over(seen_test[0], active), seen_test[1])
    u = per_class_accuracy(argmax_over(unseen_test[0], active), unseen_test[1])
    t = per_class_accuracy(argmax_over(unseen_test[0], unseen), unseen_test[1])
    return BaselineResult(T=t, U=u, S=s, H=harmonic(s, u), chance_T=1 / unseen.size, chance_gzsl=1 / active.size,
                          num_train=len(y_tr), num_seen_test=len(seen_test[1]), num_unseen_test=len(unseen_test[1]))


def pooled_split(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate (sample_ids, labels, features (n, C, H, W)) chunks into ids, labels and pooled (N, C)."""
    ids, labels, xs = [], [], []
    for i, y, f in chunks:
        ids.append(np.asarray(i))
        labels.append(np.asarray(y))
        xs.append(pool(f))
    return np.concatenate(ids), np.concatenate(labels).astype(np.int64), np.concatenate(xs)


def read_pooled(dataset: FeatureDataset, split: str, batch_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, C) and labels (N,) of one split of a FeatureDataset, streamed by record batches."""
    c, h, w = dataset.feature_shape

    def chunks() -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for shard in dataset.split(split).shards:
            with pq.ParquetFile(dataset.shard_path(shard)) as pf:
                for batch in pf.iter_batches(batch_size=batch_rows):
                    feats = batch.column("features").flatten().to_numpy(zero_copy_only=False)
                    n = batch.num_rows
                    yield (batch.column("sample_id").to_numpy(), batch.column("label").to_numpy(),
                           feats.reshape(n, c, h, w))

    _, labels, x = pooled_split(chunks())
    return x, labels


def run_baseline(dataset: FeatureDataset, phase: str = "final", alpha: float = 0.01) -> BaselineResult:
    """The baseline on a dataset directory: fit on the phase's training split, score its two evaluation splits."""
    train_split, seen_split, unseen_split = BASELINE_PHASES[phase]
    cs = dataset.class_side
    seen, unseen = (cs.seen_classes, cs.unseen_classes) if phase == "final" else (cs.train_classes, cs.val_classes)
    return evaluate_baseline(read_pooled(dataset, train_split), read_pooled(dataset, seen_split),
                             read_pooled(dataset, unseen_split), cs, seen, unseen, alpha)
