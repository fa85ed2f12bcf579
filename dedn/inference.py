"""Inference with a trained network of any family: the model files, the data a model was trained on, the `Predictor`.

A model is four files, written by `write_model_files` (which the registry logs as an MLflow model,
`dedn.tracking.registry`) and read back by `predictor_from_files` without any pickle:

* `weights.pt`   — a plain state_dict of tensors, read with `torch.load(weights_only=True)`;
* `config.yaml`  — the resolved run config (the family's inference weights at their selected values);
* `class_side.npz` — A (K, D), word vectors, class names, seen/unseen ids (allow_pickle=False);
* `model_meta.json` — feature shape, family, what the family needs to rebuild the network
  (`ModelFamily.model_meta`: DEDN's attribute clusters) and the identity of the data it was trained
  on (`DataIdentity`: dataset name, feature shape, a sha256 of the class side, semi-synthetic or not).

`Predictor.scores(features, extra_class_attributes=None)` combines the family's score parts at the
configured weights (new classes need only their attribute row); `decide`/`predict` apply the GZSL
decision of `dedn.metrics.gzsl_decision` (calibrated stacking, argmax over seen, unseen and new
classes). No MLflow here: `dedn.tracking.registry.load_predictor` loads one from the store.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
import yaml
from torch import nn

from dedn.config import RunConfig
from dedn.data.class_side import ClassSide, normalize_rows
from dedn.errors import ConfigError, DatasetError
from dedn.families import family_of
from dedn.families.base import unwrap_model
from dedn.families.capabilities import RefitsForNewClasses
from dedn.metrics import calibrated as calibrated_stacking, gzsl_decision

__all__ = [
    "WEIGHTS_FILE", "CONFIG_FILE", "CLASS_SIDE_FILE", "META_FILE", "KINDS", "IDENTITY_TAGS", "DataIdentity",
    "class_side_fingerprint", "Predictor", "predictor_from_files", "write_model_files", "read_extra_classes",
]

WEIGHTS_FILE, CONFIG_FILE, CLASS_SIDE_FILE, META_FILE = "weights.pt", "config.yaml", "class_side.npz", "model_meta.json"
KINDS = ("seen", "unseen", "new")


# ---- the identity of a model's data -------------------------------------------------------------
IDENTITY_TAGS = ("data_name", "data_feature_shape", "data_class_side", "semi_synthetic")
_CLASS_SIDE_SPLITS = ("seen_classes", "unseen_classes", "train_classes", "val_classes")


def class_side_fingerprint(cs: ClassSide) -> str:
    """sha256 (hex) of what a model's class side is: class names, attribute names, the attribute matrix A
    the models use (float32, row-normalised) and the class splits (seen, unseen, train, val; as sets).

    Deterministic across processes and machines: every array is hashed in a fixed byte order with its
    name, shape and length. Word vectors and attribute clusters are not part of it (they shape a model,
    not which images and classes it can score).
    """
    h = hashlib.sha256(b"dedn class side v1\n")

    def put(key: str, payload: bytes) -> None:
        h.update(f"{key}:{len(payload)}\n".encode())
        h.update(payload)

    put("class_names", json.dumps([str(x) for x in cs.class_names]).encode())
    put("attribute_names", json.dumps([str(x) for x in cs.attribute_names]).encode())
    a = np.ascontiguousarray(np.asarray(cs.attributes, dtype=np.float32), dtype="<f4")
    put("attributes", json.dumps(list(a.shape)).encode() + a.tobytes())
    for split in _CLASS_SIDE_SPLITS:
        put(split, np.unique(np.asarray(getattr(cs, split), dtype=np.int64)).astype("<i8").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DataIdentity:
    """Which data a model was trained on: dataset name, feature shape [C, H, W], class-side fingerprint
    (`class_side_fingerprint`), semi-synthetic or not. Two versions compete for `champion` only when
    their identities are equal; `jobs/predict.py` scores a dataset only with a model of its identity."""

    name: str
    feature_shape: tuple[int, int, int]
    class_side: str  # sha256 hex
    semi_synthetic: bool

    @classmethod
    def of(cls, class_side: ClassSide, feature_shape: Sequence[int], semi_synthetic: bool) -> "DataIdentity":
        shape = tuple(int(x) for x in feature_shape)
        return cls(str(class_side.name), shape, class_side_fingerprint(class_side), bool(semi_synthetic))  # type: ignore[arg-type]

    @classmethod
    def of_dataset(cls, dataset: Any) -> "DataIdentity":
        """The identity of an opened `dedn.data.FeatureDataset` (manifest and class side only)."""
        return cls.of(dataset.class_side, dataset.feature_shape, dataset.semi_synthetic)

    def tags(self) -> dict[str, str]:
        return {"data_name": self.name, "data_feature_shape": json.dumps(list(self.feature_shape)),
                "data_class_side": self.class_side, "semi_synthetic": str(self.semi_synthetic).lower()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str] | None) -> "DataIdentity | None":
        """The identity recorded in a version's tags; None when it records none (registered before
        identities were recorded) or an unreadable one."""
        tags = tags or {}
        if not all(k in tags for k in IDENTITY_TAGS):
            return None
        try:
            shape = json.loads(tags["data_feature_shape"])
            if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(x, int) for x in shape)):
                return None
        except ValueError:
            return None
        semi = str(tags["semi_synthetic"]).lower()
        if semi not in ("true", "false") or not tags["data_class_side"]:
            return None
        return cls(str(tags["data_name"]), tuple(shape), str(tags["data_class_side"]), semi == "true")  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "feature_shape": list(self.feature_shape), "class_side": self.class_side,
                "semi_synthetic": self.semi_synthetic}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> "DataIdentity | None":
        if not d:
            return None
        return cls(str(d["name"]), tuple(int(x) for x in d["feature_shape"]), str(d["class_side"]),  # type: ignore[arg-type]
                   bool(d["semi_synthetic"]))

    @property
    def kind(self) -> str:
        return "semi-synthetic" if self.semi_synthetic else "real features"

    def __str__(self) -> str:
        return (f"dataset {self.name}, feature shape {list(self.feature_shape)}, class side "
                f"{self.class_side[:12]}, {self.kind}")

    def differences(self, new: "DataIdentity") -> list[str]:
        """What differs from self to `new`, as 'field old -> new' phrases."""
        out = []
        if self.name != new.name:
            out.append(f"dataset {self.name} -> {new.name}")
        if self.feature_shape != new.feature_shape:
            out.append(f"feature shape {list(self.feature_shape)} -> {list(new.feature_shape)}")
        if self.class_side != new.class_side:
            out.append(f"class side {self.class_side[:12]} -> {new.class_side[:12]}")
        if self.semi_synthetic != new.semi_synthetic:
            out.append(f"{self.kind} -> {new.kind}")
        return out


# ---- the predictor ---------------------------------------------------------------------------
class Predictor:
    """Scores feature maps against every class (and optional new classes) with a trained network of any family.

    scores = the family's combination of its score parts at the config's inference weights
    (DEDN: eqs. 8 and 19 at lambda_rc, lambda_e; MSDN: w1); `predict` applies
    calibrated stacking (eval.calibration subtracted from seen classes) and takes the argmax over
    seen, unseen and new classes (generalised zero-shot).
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, class_names: Sequence[str],
                 seen_classes: Sequence[int], unseen_classes: Sequence[int], attribute_names: Sequence[str] = (),
                 data_identity: DataIdentity | None = None):
        self.model = model.eval()
        self.data_identity = data_identity  # the data it was trained on; None for a model logged before identities
        self.cfg = cfg
        self.family = family_of(cfg)
        self.class_names = tuple(map(str, class_names))
        self.attribute_names = tuple(map(str, attribute_names))
        self.seen_classes = np.asarray(seen_classes, dtype=np.int64)
        self.unseen_classes = np.asarray(unseen_classes, dtype=np.int64)
        self.feature_shape: tuple[int, int, int] = tuple(model.feature_shape)  # type: ignore[assignment]
        self.class_attributes: torch.Tensor = model.class_attributes.detach().float().cpu()  # (K, D)
        self._adapted: tuple[str, nn.Module] | None = None  # (digest of the class attributes, network)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_attributes(self) -> int:
        return int(self.class_attributes.shape[1])

    def _extra(self, extra: np.ndarray | torch.Tensor | None) -> torch.Tensor | None:
        if extra is None:
            return None
        e = torch.as_tensor(np.asarray(extra, dtype=np.float32))
        if e.ndim != 2 or e.shape[1] != self.num_attributes:
            raise ConfigError("extra_class_attributes", f"an (E, {self.num_attributes}) matrix", tuple(e.shape), "Predictor")
        if not torch.isfinite(e).all():
            raise ConfigError("extra_class_attributes", "finite values", "NaN or inf", "Predictor")
        return torch.from_numpy(normalize_rows(e.numpy()))  # (E, D), like the training A

    @torch.no_grad()
    def scores(self, features: np.ndarray | torch.Tensor, extra_class_attributes: np.ndarray | torch.Tensor | None = None,
               *, batch_size: int | None = None) -> np.ndarray:
        """features (N, C, H, W) -> scores (N, K + E) float32; E = rows of extra_class_attributes (E, D)."""
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.feature_shape:
            raise ConfigError("features", f"(N, {', '.join(map(str, self.feature_shape))})", tuple(x.shape), "Predictor")
        extra = self._extra(extra_class_attributes)
        a = self.class_attributes if extra is None else torch.cat([self.class_attributes, extra], 0)  # (K+E, D)
        bs = batch_size or self.cfg.eval.batch_size
        device = next(self.model.parameters()).device
        a = a.to(device)
        model = self.model if extra is None else self._for_classes(a)
        out = []
        for i in range(0, x.shape[0], bs):
            o = model(x[i:i + bs].to(device=device, dtype=torch.float32))
            parts = self.family.score_parts(o, class_attributes=a)  # scores are O A^T: new classes need only their row of A
            out.append(self.family.combine(self.cfg, parts).float().cpu())  # (b, K+E)
        return torch.cat(out, 0).numpy() if out else np.zeros((0, a.shape[0]), np.float32)

    def _for_classes(self, a: torch.Tensor) -> nn.Module:
        """The family's network for the classes of `a` (K + E rows): the same one for families that score
        by class attributes; a refitted copy for D3GZSL, kept for the next call with the same classes."""
        key = hashlib.sha256(a.detach().cpu().numpy().tobytes()).hexdigest()
        if self._adapted is None or self._adapted[0] != key:
            net = self.model
            if isinstance(self.family, RefitsForNewClasses):
                net = self.family.for_classes(net, self.cfg, a, seen=self.seen_classes.tolist(),
                                              unseen=self.unseen_classes.tolist())
            self._adapted = (key, net.eval())
        return self._adapted[1]

    def _seen(self, width: int) -> torch.Tensor:
        """(width,) bool: the seen classes among `width` score columns (K known classes, then new ones)."""
        seen = torch.zeros(width, dtype=torch.bool)
        seen[torch.from_numpy(self.seen_classes)] = True
        return seen

    def calibrated(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated stacking: eval.calibration subtracted from the seen-class columns."""
        z = torch.from_numpy(np.array(scores, dtype=np.float32))  # (N, K + E), a copy
        return calibrated_stacking(z, self._seen(z.shape[1]), self.cfg.eval.calibration).numpy()

    def decide(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """scores (N, K + E) -> (class ids (N,) int64, the winner's calibrated score (N,) float32).

        `dedn.metrics.gzsl_decision` over seen, unseen and new classes (ids >= K are new; classes of
        neither set, none in a normal dataset, never win), as at evaluation.
        """
        z = torch.from_numpy(np.array(scores, dtype=np.float32))  # (N, K + E), a copy
        width = z.shape[1]
        classes = torch.from_numpy(np.union1d(np.union1d(self.seen_classes, self.unseen_classes),
                                              np.arange(self.num_classes, width, dtype=np.int64)))  # ascending
        ids, best = gzsl_decision(z[:, classes], classes, self._seen(width)[classes], self.cfg.eval.calibration)
        return ids.numpy().astype(np.int64), best.numpy().astype(np.float32)

    def predict(self, features: np.ndarray | torch.Tensor, extra_class_attributes: np.ndarray | torch.Tensor | None = None
                ) -> np.ndarray:
        """features (N, C, H, W) -> class ids (N,) int64 over seen, unseen and new classes (ids K.. are new)."""
        return self.decide(self.scores(features, extra_class_attributes))[0]

    def kind(self, class_ids: np.ndarray) -> np.ndarray:
        """'seen' | 'unseen' | 'new' for each class id."""
        ids = np.asarray(class_ids, dtype=np.int64)
        out = np.full(ids.shape, "new", dtype=object)
        out[np.isin(ids, self.seen_classes)] = "seen"
        out[np.isin(ids, self.unseen_classes)] = "unseen"
        return out


def _build_network(cfg: RunConfig, cs: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                   feature_shape: Sequence[int]) -> nn.Module:
    """The network of cfg.model.name through its family, with what it was built with (`meta`)."""
    no_ids = np.zeros(0, np.int64)
    class_side = ClassSide(
        name=cfg.dataset, class_names=tuple(map(str, cs["class_names"])), attribute_names=tuple(map(str, cs["attribute_names"])),
        attributes_raw=cs.get("attributes_raw", cs["attributes"]), attributes=cs["attributes"], word_vectors=cs["word_vectors"],
        seen_classes=cs["seen_classes"], unseen_classes=cs["unseen_classes"], train_classes=no_ids, val_classes=no_ids,
    )
    return family_of(cfg).build(cfg, class_side, tuple(int(x) for x in feature_shape), meta)


def predictor_from_files(directory: str | os.PathLike[str] | Mapping[str, str], device: str = "cpu") -> Predictor:
    """A Predictor from the four model files (a folder, or MLflow's artifact-name -> path map)."""
    paths = dict(directory) if isinstance(directory, Mapping) else {
        k: str(Path(directory) / f) for k, f in
        (("weights", WEIGHTS_FILE), ("config", CONFIG_FILE), ("class_side", CLASS_SIDE_FILE), ("meta", META_FILE))}
    with open(paths["config"]) as f:
        cfg = RunConfig.from_dict(yaml.safe_load(f), source=paths["config"])
    meta = json.loads(Path(paths["meta"]).read_text())
    try:
        with np.load(paths["class_side"], allow_pickle=False) as z:
            cs = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DatasetError(paths["class_side"], "file", "an npz without pickles", f"{type(e).__name__}: {e}") from None
    model = _build_network(cfg, cs, meta.get("family_meta", {}), meta["feature_shape"])
    state = torch.load(paths["weights"], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device)
    return Predictor(model, cfg, cs["class_names"].tolist(), cs["seen_classes"], cs["unseen_classes"],
                     cs["attribute_names"].tolist(), data_identity=DataIdentity.from_json(meta.get("data")))


# ---- writing ---------------------------------------------------------------------------------
def write_model_files(model: nn.Module, cfg: RunConfig, class_side: ClassSide, out_dir: str | os.PathLike[str],
                      identity: DataIdentity | None = None) -> dict[str, str]:
    """Write weights.pt, config.yaml, class_side.npz and model_meta.json to out_dir; artifact name -> path.

    identity: the data the model was trained on, kept in model_meta.json under "data"."""
    net = unwrap_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}  # plain tensors only
    torch.save(state, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(cfg.to_yaml())
    np.savez(
        out / CLASS_SIDE_FILE,
        attributes=np.asarray(class_side.attributes, np.float32),
        attributes_raw=np.asarray(class_side.attributes_raw, np.float32),
        word_vectors=np.asarray(class_side.word_vectors, np.float32),
        class_names=np.asarray(class_side.class_names, dtype=str),
        attribute_names=np.asarray(class_side.attribute_names, dtype=str),
        seen_classes=np.asarray(class_side.seen_classes, np.int64),
        unseen_classes=np.asarray(class_side.unseen_classes, np.int64),
    )
    meta = {"feature_shape": list(net.feature_shape), "family_meta": family_of(cfg).model_meta(net),
            "model": cfg.model.name, "dataset": cfg.dataset, "variant": cfg.variant, "format": 2}
    if identity is not None:
        meta["data"] = identity.to_json()
    (out / META_FILE).write_text(json.dumps(meta))
    return {"weights": str(out / WEIGHTS_FILE), "config": str(out / CONFIG_FILE),
            "class_side": str(out / CLASS_SIDE_FILE), "meta": str(out / META_FILE)}


def read_extra_classes(path: str | os.PathLike[str], num_attributes: int,
                       existing_names: Sequence[str] = ()) -> tuple[list[str], np.ndarray]:
    """New classes from CSV or Parquet: column `name`, then D attribute values. -> (names (E,), raw (E, D)).

    Refused, naming the file and the class: non-numeric or non-finite values, an all-zero
    attribute vector (it has no direction to score against), a name the model already has.
    """
    p = Path(path)
    try:
        table = pq.read_table(p) if p.suffix.lower() == ".parquet" else pacsv.read_csv(p)
    except (OSError, pa.ArrowInvalid) as e:
        raise DatasetError(p, "file", "a CSV or Parquet table", f"{type(e).__name__}: {e}") from None
    cols = table.column_names
    if not cols or cols[0] != "name":
        raise DatasetError(p, "columns", "first column 'name'", cols[:3])
    if len(cols) - 1 != num_attributes:
        raise DatasetError(p, "columns", f"name + {num_attributes} attribute columns", f"name + {len(cols) - 1}")
    names = [str(x) for x in table.column("name").to_pylist()]
    try:
        values = np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in cols[1:]], 1)
    except (ValueError, TypeError, pa.ArrowInvalid) as e:
        raise DatasetError(p, "attribute values", "numbers", f"{type(e).__name__}: {e}") from None
    if not np.isfinite(values).all():
        raise DatasetError(p, "attribute values", "finite numbers", "NaN or inf")
    if len(set(names)) != len(names) or not names:
        raise DatasetError(p, "name", "unique, non-empty class names", f"{len(names)} rows, {len(set(names))} distinct")
    taken = sorted(set(names) & set(map(str, existing_names)))
    if taken:
        raise DatasetError(p, "name", "names that are not already classes of the model", f"existing {taken[:5]}")
    zero = [n for n, row in zip(names, values) if not np.any(row)]
    if zero:
        raise DatasetError(p, "attribute values", "a non-zero attribute vector for every class", f"all zeros for {zero[:5]}")
    return names, values.astype(np.float32)
