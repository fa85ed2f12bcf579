"""Semi-synthetic, visually grounded feature maps on a real class side.

Real image features cannot be had on these machines, so `dedn` can write a dataset whose class
side (class attributes, word vectors, xlsa17 splits, per-image labels) is the real one and whose
feature maps are drawn from a generative model that mimics how a CNN sees attributes:

* every attribute d has a sparse non-negative channel signature s_d (C,) — a few dozen channels
  (about C/64) — and a preferred place on the image: attributes of one manual cluster (CUB "head",
  "wing", ...) share an area of the grid, each with its own offset;
* an image of class k shows attribute d with probability p_kd = sigmoid(sharpness * (v_kd - threshold)),
  v_kd = the class's raw attribute value scaled to [0, 1] per attribute (its maximum over classes),
  so classes with similar attributes give similar images and zero-shot transfer is possible;
* a shown attribute adds intensity * s_d ⊗ bump to the map, bump being a Gaussian over the H x W grid
  centred at the attribute's place, jittered per image; intensities are log-normal;
* nuisance: exponential (non-negative) background on every channel and place, a few distractor
  channels per image with bumps at random places, a per-image gain.

Everything is non-negative like post-ReLU maps; 1 x 1 grids work (the bump is then 1).
The difficulty knobs live in `SyntheticConfig`; the defaults were tuned so that a ridge-regression
baseline (`dedn.analysis.baseline`) on CUB is well above chance and far from perfect.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple

import numpy as np

from dedn.data import SPLITS
from dedn.data.clusters import MANUAL_CLUSTERS, kmeans_clusters
from dedn.data.convert import write_dataset
from dedn.errors import ConfigError
from dedn.data.sources import ClassSideSource, build_class_side, load_source, make_splits


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and difficulty of the generator (defaults: ResNet-101-like 2048 x 7 x 7 maps)."""

    channels: int = 2048
    height: int = 7
    width: int = 7
    images_per_class: int | None = None  # cap per class and split; None = every real image
    seed: int = 0
    signature_channels: int = 0  # channels per attribute signature; 0 = max(4, C // 64)
    sharpness: float = 6.0  # slope of the presence probability in the scaled attribute value
    threshold: float = 0.45  # scaled attribute value shown by half the images of a class
    intensity_sigma: float = 0.5  # log-normal spread of an attribute's intensity per image
    cluster_radius: float = 0.3  # distance of cluster centres from the image centre (unit square)
    attribute_offset: float = 0.08  # spread of an attribute's place around its cluster centre
    jitter: float = 0.1  # per-image displacement of an attribute's place
    bump_sigma: float = 0.15  # width of an attribute's bump (unit square)
    background: float = 0.3  # mean of the exponential background noise
    distractors: int = 0  # distractor channels per image; 0 = max(1, C // 32)
    distractor_gain: float = 2.0
    image_gain_sigma: float = 0.25  # log-normal spread of a per-image overall gain
    chunk_size: int = 256  # images generated at once

    def __post_init__(self) -> None:
        for key in ("channels", "height", "width", "chunk_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"synthetic.{key}", "a positive int", getattr(self, key))
        if self.images_per_class is not None and self.images_per_class < 1:
            raise ConfigError("synthetic.images_per_class", "a positive int or None", self.images_per_class)
        for key in ("signature_channels", "distractors"):
            if getattr(self, key) < 0:
                raise ConfigError(f"synthetic.{key}", "an int >= 0 (0 = automatic)", getattr(self, key))
        if self.signature_channels > self.channels:
            raise ConfigError("synthetic.signature_channels", f"at most channels={self.channels}", self.signature_channels)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True)
class AttributeModel:
    """The fixed part of the generator: per-attribute signatures and places, per-class presence."""

    signatures: np.ndarray  # (D, C) float32, non-negative, sparse
    places: np.ndarray  # (D, 2) float32, (row, col) in the unit square
    presence: np.ndarray  # (K, D) float32, probability that an image of class k shows attribute d


class SyntheticChunk(NamedTuple):
    sample_ids: np.ndarray  # (n,) int64 image indices
    labels: np.ndarray  # (n,) int64
    features: np.ndarray  # (n, C, H, W) float32


def attribute_clusters(src: ClassSideSource) -> list[list[int]]:
    """The clusters that decide where attributes appear: manual ones when known, else 4 k-means clusters."""
    if src.name in MANUAL_CLUSTERS:
        return [list(v) for v in MANUAL_CLUSTERS[src.name].values()]
    q = min(4, src.num_attributes)
    return [list(v) for v in kmeans_clusters(src.word_vectors, q, seed=0).values()]


def presence_probability(original_att: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """p (K, D): sigmoid(sharpness * (v - threshold)), v = raw value / its maximum over classes, clipped to [0, 1]."""
    # negative values (AWA's -1 missing-value marks, signed embedding values such as FLO's) count as absent
    raw = np.maximum(np.asarray(original_att, dtype=np.float64), 0.0)
    top = raw.max(axis=0, keepdims=True)
    v = np.clip(raw / np.where(top > 0, top, 1.0), 0.0, 1.0)
    return (1.0 / (1.0 + np.exp(-cfg.sharpness * (v - cfg.threshold)))).astype(np.float32)


def build_model(src: ClassSideSource, cfg: SyntheticConfig) -> AttributeModel:
    """Draw signatures and places (seeded by cfg.seed) and compute presence probabilities."""
    rng = np.random.default_rng([cfg.seed, 0])
    d, c = src.num_attributes, cfg.channels
    nnz = cfg.signature_channels or max(4, c // 64)
    nnz = min(nnz, c)
    signatures = np.zeros((d, c), dtype=np.float32)
    for a in range(d):
        chans = rng.choice(c, size=nnz, replace=False)
        signatures[a, chans] = rng.uniform(0.5, 1.5, size=nnz)
    clusters = attribute_clusters(src)
    phase = rng.uniform(0, 2 * np.pi)
    places = np.zeros((d, 2), dtype=np.float32)
    for q, ids in enumerate(clusters):
        angle = phase + 2 * np.pi * q / len(clusters)
        centre = 0.5 + cfg.cluster_radius * np.array([np.sin(angle), np.cos(angle)])
        places[ids] = centre + rng.normal(0, cfg.attribute_offset, size=(len(ids), 2))
    return AttributeModel(signatures=signatures, places=np.clip(places, 0.0, 1.0),
                          presence=presence_probability(src.original_att, cfg))


def _grid(h: int, w: int) -> np.ndarray:
    """Cell centres (R, 2) in the unit square, row-major like F.reshape(C, H*W)."""
    r, c = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float32)


def render(model: AttributeModel, labels: np.ndarray, cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Feature maps (n, C, H, W) float32 for images of the given classes (n,)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.shape[0]
    d, c = model.signatures.shape
    grid = _grid(cfg.height, cfg.width)  # (R, 2)
    r = grid.shape[0]
    shown = rng.random((n, d), dtype=np.float32) < model.presence[labels]  # (n, D)
    amp = shown * rng.lognormal(0.0, cfg.intensity_sigma, size=(n, d)).astype(np.float32)  # (n, D)
    where = model.places[None] + rng.normal(0, cfg.jitter, size=(n, d, 2)).astype(np.float32)  # (n, D, 2)
    dist2 = ((where[:, :, None, :] - grid[None, None]) ** 2).sum(-1)  # (n, D, R)
    bump = np.exp(-dist2 / (2 * cfg.bump_sigma**2)) if r > 1 else np.ones((n, d, 1), np.float32)
    weights = amp[:, :, None] * bump  # (n, D, R)
    feats = np.matmul(weights.transpose(0, 2, 1), model.signatures)  # (n, R, C)
    feats = feats.transpose(0, 2, 1)  # (n, C, R)
    # Distractors: a few random channels per image light up in a random place.
    k = cfg.distractors or max(1, c // 32)
    chans = rng.integers(0, c, size=(n, k))  # (n, k)
    spots = rng.random((n, k, 2), dtype=np.float32)
    dbump = np.exp(-((spots[:, :, None, :] - grid[None, None]) ** 2).sum(-1) / (2 * cfg.bump_sigma**2)) if r > 1 \
        else np.ones((n, k, 1), np.float32)  # (n, k, R)
    damp = cfg.distractor_gain * rng.lognormal(0.0, cfg.intensity_sigma, size=(n, k, 1)).astype(np.float32)
    np.add.at(feats, (np.arange(n)[:, None], chans), damp * dbump)
    feats += rng.exponential(cfg.background, size=feats.shape).astype(np.float32)
    feats *= rng.lognormal(0.0, cfg.image_gain_sigma, size=(n, 1, 1)).astype(np.float32)
    return feats.reshape(n, c, cfg.height, cfg.width).astype(np.float32, copy=False)


def plan_splits(src: ClassSideSource, cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Sorted image ids of each split: the real splits, or at most images_per_class per class and split."""
    assert src.labels is not None
    splits = make_splits(src.labels, src.locs, seed=cfg.seed, origin=src.origin)
    if cfg.images_per_class is None:
        return splits
    rng = np.random.default_rng([cfg.seed, 1])
    out = {}
    for name in SPLITS:
        ids = splits[name]
        lab = src.labels[ids]
        keep = [rng.permutation(ids[lab == k])[: cfg.images_per_class] for k in np.unique(lab)]
        out[name] = np.sort(np.concatenate(keep))
    return out


def generate(src: ClassSideSource, cfg: SyntheticConfig | None = None,
             split_ids: Mapping[str, np.ndarray] | None = None, **overrides: object) -> Iterator[SyntheticChunk]:
    """Chunks of at most cfg.chunk_size images covering every image of every split once, ids ascending.

    Keyword overrides set SyntheticConfig fields, e.g. generate(src, channels=256, height=7, width=7).
    An image in several splits (trainval and train) is generated once, so it has one feature map.
    """
    cfg = replace(cfg or SyntheticConfig(), **overrides)  # type: ignore[arg-type]
    if src.labels is None:
        raise ConfigError("synthetic.source", "a class-side source with per-image labels", src.origin)
    split_ids = split_ids if split_ids is not None else plan_splits(src, cfg)
    ids = np.unique(np.concatenate([np.asarray(v, dtype=np.int64) for v in split_ids.values()]))
    model = build_model(src, cfg)
    rng = np.random.default_rng([cfg.seed, 2])
    for start in range(0, ids.size, cfg.chunk_size):
        chunk = ids[start:start + cfg.chunk_size]
        labels = src.labels[chunk]
        yield SyntheticChunk(chunk, labels, render(model, labels, cfg, rng))


def write_synthetic(root: str | Path, name: str, source_dir: str | Path | None = None, *,
                    word_vectors: str | Path | None = None, storage_dtype: str = "float16", overwrite: bool = False,
                    progress: bool = True, shard_bytes: int | None = None, **sizes: object) -> Path:
    """Write a semi-synthetic dataset for `name` (CUB, SUN, AWA2) to `root` via DatasetWriter.

    sizes: SyntheticConfig fields (channels, height, width, images_per_class, seed, ...).
    source_dir: a shared-style folder with the real files; None = the packaged asset.
    word_vectors: the word-vector file when the folder has no <name>_attribute.pkl/.npy/.txt.
    """
    cfg = SyntheticConfig(**sizes)  # type: ignore[arg-type]
    if word_vectors is not None and source_dir is None:
        raise ConfigError("synthetic.word_vectors", "a --source-dir to go with --word-vectors (the packaged "
                          "class sides bring their own)", str(word_vectors))
    src = load_source(name, source_dir, word_vectors, seed=cfg.seed)
    class_side = build_class_side(src)
    split_ids = plan_splits(src, cfg)
    return write_dataset(
        root, class_side, split_ids, generate(src, cfg, split_ids), feature_shape=cfg.feature_shape,
        storage_dtype=storage_dtype, source="synthetic", semi_synthetic=True, overwrite=overwrite,
        progress=progress, shard_bytes=shard_bytes,
    )
