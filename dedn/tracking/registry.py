"""The MLflow model registry for every model family: log, register, alias, load; and the inference wrapper.

(~420 lines on purpose: the four model files, the `Predictor` rebuilt from them and the MLflow
calls that log and load them are one contract; split, each side would restate the other's.)

A model is logged as an MLflow pyfunc *from code* (`dedn/tracking/pyfunc_model.py`), never as a pickle:
loading it runs our own code, which reads

* `weights.pt`   — a plain state_dict of tensors, read with `torch.load(weights_only=True)`;
* `config.yaml`  — the resolved run config (the family's inference weights at their selected values);
* `class_side.npz` — A (K, D), word vectors, class names, seen/unseen ids (allow_pickle=False);
* `model_meta.json` — feature shape, family and what the family needs to rebuild the network
  (`ModelFamily.model_meta`: DEDN's attribute clusters).

Registered name `<model>-<dataset lowercase>` (`dedn-cub`, `msdn-cub`); each version carries its validation and test
metrics as tags, and the identity of the data it was trained on (`DataIdentity`: dataset name, feature
shape, a sha256 of the class side, semi-synthetic or not) as tags and in `model_meta.json`.

The alias `champion` (`best_version`, `promote_best`): versions compete on validation H only with
versions of the same data. The alias follows the newest data: the versions that compete are those
with the identity of the newest version that records one; the best of them by `val_H` (a tie keeps
the earlier version) is champion. A version on other data therefore never takes, nor keeps, the alias
on validation H alone, and a registration that moves the alias to new data says so in its line
(`RegisteredVersion.champion_line`), naming what differs. Versions registered before identities
were recorded have none: they compete only while no version records one (the old rule), and a
champion among them gives way to the first version that records its data, with a line that says so.
Why not refuse to move the alias instead: the alias would then stay on a model that cannot score the
data being worked on (`jobs/predict.py` on the new data would fail), and the only way forward would
be a manual alias move that the next registration undoes; training on new data is what says which
data the model of record is for.

`load_predictor("models:/dedn-cub@champion")` gives a `Predictor` with
`.scores(features, extra_class_attributes=None)`, `.predict(...)` and `.data_identity`.
Loading needs the `dedn` package importable (installed), like any models-from-code model.
"""
from __future__ import annotations

import contextlib
import hashlib

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from dedn.data.class_side import ClassSide, normalize_rows
from dedn.config import DEDNConfig
from dedn.errors import ConfigError, DatasetError
from dedn.families import family_of
from dedn.training.loop import unwrap_model

try:  # the wrapper subclasses PythonModel when MLflow is there; the predictor itself needs no MLflow
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object  # type: ignore[assignment,misc]

__all__ = [
    "CHAMPION", "registered_name", "Predictor", "PyfuncModel", "write_model_files", "log_model",
    "RegisteredVersion", "register_model", "promote_best", "best_version", "competing_versions", "load_predictor",
    "pip_requirements", "read_extra_classes", "DataIdentity", "class_side_fingerprint", "IDENTITY_TAGS", "identity_of",
    "resolve_version", "versions_on_data",
]

CHAMPION = "champion"
WEIGHTS_FILE, CONFIG_FILE, CLASS_SIDE_FILE, META_FILE = "weights.pt", "config.yaml", "class_side.npz", "model_meta.json"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
KINDS = ("seen", "unseen", "new")


def registered_name(dataset: str, model: str = "dedn") -> str:
    """`dedn-cub`, `msdn-cub`: one registered model per (model family, dataset)."""
    return f"{model.lower()}-{dataset.lower()}"


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


def identity_of(mv: Any) -> DataIdentity | None:
    """The data identity a registered version (an MLflow ModelVersion) records in its tags, or None."""
    return DataIdentity.from_tags(getattr(mv, "tags", None))


# ---- the predictor ---------------------------------------------------------------------------
class Predictor:
    """Scores feature maps against every class (and optional new classes) with a trained network of any family.

    scores = the family's combination of its score parts at the config's inference weights
    (DEDN: eqs. 8 and 19 at lambda_rc, lambda_e; MSDN: w1); `predict` applies
    calibrated stacking (eval.calibration subtracted from seen classes) and takes the argmax over
    seen, unseen and new classes (generalised zero-shot).
    """

    def __init__(self, model: nn.Module, cfg: DEDNConfig, class_names: Sequence[str],
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
            self._adapted = (key, self.family.for_classes(self.model, self.cfg, a, seen=self.seen_classes.tolist(),
                                                          unseen=self.unseen_classes.tolist()).eval())
        return self._adapted[1]

    def calibrated(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated stacking: eval.calibration subtracted from the seen-class columns."""
        z = np.array(scores, dtype=np.float32, copy=True)
        z[:, self.seen_classes] -= self.cfg.eval.calibration
        return z

    def decide(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """scores (N, K + E) -> (class ids (N,) int64, the winner's calibrated score (N,) float32).

        GZSL argmax over seen, unseen and new classes (ids >= K are new) after calibrated stacking.
        """
        z = self.calibrated(scores)  # (N, K + E)
        known = np.zeros(z.shape[1], dtype=bool)
        known[self.seen_classes] = known[self.unseen_classes] = True
        known[self.num_classes:] = True  # new classes always compete
        z[:, ~known] = -np.inf  # classes of neither set (none in a normal dataset) never win
        ids = z.argmax(1).astype(np.int64)
        return ids, z[np.arange(len(ids)), ids].astype(np.float32)

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


def _build_network(cfg: DEDNConfig, cs: Mapping[str, np.ndarray], meta: Mapping[str, Any],
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
        cfg = DEDNConfig.from_dict(yaml.safe_load(f), source=paths["config"])
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


# ---- the pyfunc wrapper (models from code: dedn/tracking/pyfunc_model.py) -------------------
class PyfuncModel(_PythonModel):  # type: ignore[misc,valid-type]
    """MLflow pyfunc: predict(features (N, C, H, W) float32) -> scores (N, K) float32.

    params {"output": "class_id"} returns class ids (N,) instead (calibrated, GZSL argmax).
    The Predictor is `.predictor` (reach it with `PyFuncModel.unwrap_python_model()`).
    """

    predictor: Predictor | None = None

    def load_context(self, context: Any) -> None:
        self.predictor = predictor_from_files(context.artifacts)

    # np.ndarray is the one input hint MLflow takes without deriving a schema from it (the signature
    # is given explicitly at logging); with no hint at all it warns on every import of this module.
    def predict(self, context, model_input: np.ndarray, params=None):  # type: ignore[no-untyped-def]
        assert self.predictor is not None, "load_context was not called"
        if isinstance(model_input, Mapping):  # a named tensor input arrives as {name: array}
            model_input = next(iter(model_input.values()))
        x = np.asarray(model_input, dtype=np.float32)
        if (params or {}).get("output", "scores") == "class_id":
            return self.predictor.predict(x)
        return self.predictor.scores(x)


# ---- writing and logging ---------------------------------------------------------------------
def write_model_files(model: nn.Module, cfg: DEDNConfig, class_side: ClassSide, out_dir: str | os.PathLike[str],
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


def pip_requirements() -> list[str]:
    """Given explicitly: inferring them costs 5-7 s per log_model (docs/stack-notes.md#mlflow-3172). Local labels (+cpu) dropped."""
    import importlib.metadata as md

    reqs = []
    for pkg in ("torch", "numpy", "pyyaml", "mlflow"):
        try:
            reqs.append(f"{pkg}=={md.version(pkg).split('+')[0]}")
        except md.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_model(model: nn.Module, cfg: DEDNConfig, class_side: ClassSide, *, run_id: str, name: str = "model",
              registered_model_name: str | None = None, input_example: np.ndarray | None = None,
              identity: DataIdentity | None = None) -> Any:
    """Log the network as a models-from-code pyfunc into run `run_id`; returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from mlflow.types.schema import ParamSchema, ParamSpec

    net = unwrap_model(model)
    c, h, w = net.feature_shape
    k = int(net.class_attributes.shape[0])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),  # features (N, C, H, W)
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))]),  # scores (N, K)
        params=ParamSchema([ParamSpec("output", "string", "scores")]),
    )
    if input_example is not None:
        input_example = np.asarray(input_example[:1], dtype=np.float32)  # one row: the example is stored as JSON
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        # MLflow suggests predict type hints for schema inference; the explicit signature does that job
        warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
        files = write_model_files(net, cfg, class_side, d, identity)
        with mlflow.start_run(run_id=run_id), _quiet_registration():
            return mlflow.pyfunc.log_model(
                name=name, python_model=str(PYFUNC_CODE), artifacts=files, signature=signature,
                input_example=input_example, pip_requirements=pip_requirements(),
                registered_model_name=registered_model_name,
            )


@contextlib.contextmanager
def _quiet_registration() -> Iterator[None]:
    """Silence MLflow's own event stream for one registration: it prints "Successfully registered
    model ..." and "Created version ..." to stderr, which the job's own line (name, version, what
    happened to the champion alias) already says. Failures still raise."""
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM
    before = stream.enabled
    stream.enabled = False
    try:
        yield
    finally:
        stream.enabled = before


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    model_uri: str  # models:/name/version
    champion: bool  # whether alias `champion` now points at this version
    previous_champion_val_H: float | None
    champion_version: str | None = None  # where the alias points after this registration
    identity: DataIdentity | None = None  # the data of this version
    previous_champion_version: str | None = None  # where the alias pointed before this registration
    previous_identity: DataIdentity | None = None  # that version's data (None: it records none)
    champion_identity: DataIdentity | None = None  # the data of the version the alias points at now

    @property
    def data_changed(self) -> bool:
        """Whether this version's data differs from the previous champion's (or that one records none)."""
        return (self.identity is not None and self.previous_champion_version not in (None, self.version)
                and self.previous_identity != self.identity)

    def champion_line(self) -> str:
        """What happened to the alias, and why, in one line for the console."""
        cv = self.champion_version
        if self.data_changed:
            prev = self.previous_champion_version
            if self.previous_identity is None:
                why = (f"version {prev} records no data identity (registered before versions recorded their "
                       f"data), so its validation H is not comparable")
                tail = "versions of other data no longer compete, nor versions that record none"
            else:
                assert self.identity is not None
                why = f"data differs from version {prev}'s ({'; '.join(self.previous_identity.differences(self.identity))})"
                tail = "versions of other data no longer compete"
            if self.champion:
                return f"alias champion moved here: {why}; {tail}"
            if self.champion_identity == self.identity:
                return f"alias champion moved to version {cv}, the best version on this data: {why}; {tail}"
        if (not self.champion and self.identity is not None and self.champion_identity is not None
                and self.champion_identity != self.identity):  # a concurrent registration on other data
            diff = "; ".join(self.identity.differences(self.champion_identity))
            return f"alias champion is on version {cv}, registered meanwhile on other data ({diff}); the newest data's versions compete"
        if self.champion:
            return "alias champion moved here" if self.previous_champion_val_H is not None else "alias champion set"
        return (f"alias champion stays on version {cv} (its validation H "
                f"{self.previous_champion_val_H!r} is not beaten; a tie keeps the earlier version)")


def _metric_tags(prefix: str, metrics: Mapping[str, float]) -> dict[str, str]:
    # repr: the shortest string that reads back as the same float, so promotion compares the values
    # themselves (a rounded tag once let an identical rerun win a "tie" against it)
    return {f"{prefix}{k}": repr(float(v)) for k, v in metrics.items()}


def register_model(model: nn.Module, cfg: DEDNConfig, class_side: ClassSide, *, run_id: str,
                   val_metrics: Mapping[str, float], test_metrics: Mapping[str, float],
                   input_example: np.ndarray | None = None, semi_synthetic: bool | None = None) -> RegisteredVersion:
    """Log + register as `<model>-<dataset>`, tag the version with its metrics and its data, point `champion`
    at the best version on the newest data (`best_version`).

    val_metrics / test_metrics: {"T", "U", "S", "H"} fractions; tagged as val_* / test_*.
    The data identity (`DataIdentity`: class_side.name, the network's feature shape, the class-side
    fingerprint, `semi_synthetic`) is tagged as `IDENTITY_TAGS` and kept in model_meta.json.
    semi_synthetic: whether the data is semi-synthetic; None reads it from the run's `semi_synthetic` tag
    (every training run has one; false when the run has none).
    """
    from mlflow.exceptions import MlflowException

    from dedn.tracking import store as tracking

    tracking.init_store()
    name = registered_name(cfg.dataset, cfg.model.name)
    c = tracking.client()
    if semi_synthetic is None:
        try:
            semi_synthetic = c.get_run(run_id).data.tags.get("semi_synthetic") == "true"
        except MlflowException:
            semi_synthetic = False
    identity = DataIdentity.of(class_side, unwrap_model(model).feature_shape, semi_synthetic)
    try:  # the alias before this registration: what the line compares with
        before = c.get_model_version_by_alias(name, CHAMPION)
        old_h: float | None = _tag_float(before.tags, "val_H")
        old_version: str | None = str(before.version)
        old_identity = identity_of(before)
    except MlflowException:  # no such model or no alias yet
        old_h, old_version, old_identity = None, None, None
    info = log_model(model, cfg, class_side, run_id=run_id, registered_model_name=name, input_example=input_example,
                     identity=identity)
    version = str(info.registered_model_version)
    tags = {**_metric_tags("val_", val_metrics), **_metric_tags("test_", test_metrics),
            "run_id": run_id, "variant": cfg.variant, **identity.tags()}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    champion = promote_best(name)
    if champion == version or champion is None:
        champion_identity = identity if champion else None
    else:
        try:
            champion_identity = identity_of(c.get_model_version(name, champion))
        except MlflowException:
            champion_identity = None
    return RegisteredVersion(name, version, f"models:/{name}/{version}", champion == version, old_h, champion,
                             identity=identity, previous_champion_version=old_version, previous_identity=old_identity,
                             champion_identity=champion_identity)


def _tag_float(tags: Mapping[str, str] | None, key: str) -> float:
    try:
        return float((tags or {}).get(key, "nan"))
    except ValueError:
        return float("nan")


def _val_h(mv: Any) -> float:
    try:
        h = float((mv.tags or {}).get("val_H", "nan"))
    except ValueError:
        return float("nan")
    return h if np.isfinite(h) else float("nan")


def competing_versions(versions: Sequence[Any]) -> list[Any]:
    """The versions that compete for `champion`: those on the newest data.

    The newest data is the identity (`identity_of`) of the highest-numbered version that records one;
    versions of any other identity, and versions that record none, do not compete. When no version
    records an identity (all registered before identities were recorded), every version competes.
    """
    known = [(v, identity_of(v)) for v in versions]
    known = [(v, i) for v, i in known if i is not None]
    if not known:
        return list(versions)
    newest = max(known, key=lambda vi: int(vi[0].version))[1]
    return [v for v, i in known if i == newest]


def best_version(versions: Sequence[Any]) -> str | None:
    """Among `competing_versions` (the newest data's): the highest val_H tag (ties: the earliest); the newest
    when none has one. A version on other data never wins on validation H alone."""
    versions = competing_versions(versions)
    if not versions:
        return None
    scored = [(v, _val_h(v)) for v in versions]
    finite = [(v, h) for v, h in scored if np.isfinite(h)]
    if not finite:
        return str(max(int(v.version) for v in versions))
    return str(min(finite, key=lambda vh: (-vh[1], int(vh[0].version)))[0].version)


def promote_best(name: str, attempts: int = 20) -> str | None:
    """Point `champion` at the best version of `name` (`best_version`: by val_H among the newest data's) and return it.

    Safe under concurrent registrations without a lock (a remote server has none to offer):
    every registrant writes the alias and then reads again, until the alias it reads is the
    best of the versions it reads. The last writer's check sees every version created before
    its write, so the alias always ends on the best version.
    """
    from mlflow.exceptions import MlflowException

    from dedn.tracking import store as tracking

    c = tracking.client()
    best = None
    for _ in range(attempts):
        best = best_version(c.search_model_versions(f"name='{name}'"))
        if best is None:
            return None
        c.set_registered_model_alias(name, CHAMPION, best)
        try:
            now = str(c.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            now = None
        if now == best and best_version(c.search_model_versions(f"name='{name}'")) == best:
            return best
    return best


# ---- loading ---------------------------------------------------------------------------------
def resolve_version(uri: str) -> tuple[str, str] | None:
    """`models:/name/3` or `models:/name@alias` -> (name, version); None for other URIs or when unknown."""
    from mlflow.exceptions import MlflowException

    from dedn.tracking import store as tracking

    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):].strip("/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, str(tracking.client().get_model_version_by_alias(name, alias).version)
        name, _, version = rest.rpartition("/")
        return (name, version) if name and version.isdigit() else None
    except MlflowException:
        return None


def versions_on_data(name: str, identity: DataIdentity) -> list[str]:
    """The versions of registered model `name` trained on data of `identity`, oldest first."""
    from mlflow.exceptions import MlflowException

    from dedn.tracking import store as tracking

    try:
        versions = tracking.client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return [str(v) for v in sorted(int(mv.version) for mv in versions if identity_of(mv) == identity)]


def load_predictor(uri: str) -> Predictor:
    """`models:/dedn-cub@champion`, `models:/msdn-cub/3`, `runs:/<id>/model` -> Predictor."""
    import mlflow.pyfunc

    from dedn.tracking import store as tracking

    from mlflow.exceptions import MlflowException

    tracking.init_store()
    try:
        wrapper = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (MlflowException, OSError) as e:  # no such model, version, alias or run
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("model uri", "a registered model version, alias or run model in the store "
                          f"({tracking.tracking_uri()})", f"{uri}: {first}", "load_predictor") from None
    if not isinstance(wrapper, PyfuncModel) or wrapper.predictor is None:
        raise ConfigError("model uri", "a model logged by dedn.tracking.registry", f"{uri} ({type(wrapper).__name__})", "load_predictor")
    return wrapper.predictor


def read_extra_classes(path: str | os.PathLike[str], num_attributes: int,
                       existing_names: Sequence[str] = ()) -> tuple[list[str], np.ndarray]:
    """New classes from CSV or Parquet: column `name`, then D attribute values. -> (names (E,), raw (E, D)).

    Refused, naming the file and the class: non-numeric or non-finite values, an all-zero
    attribute vector (it has no direction to score against), a name the model already has.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

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
