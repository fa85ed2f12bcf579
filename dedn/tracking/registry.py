"""The MLflow model registry for every model family: log, register, alias, load.

A model is logged as an MLflow pyfunc *from code* (`dedn/tracking/pyfunc_model.py`), never as a
pickle: loading it runs our own code, which reads the four model files of `dedn.inference`
(`write_model_files`, `predictor_from_files`: weights, config, class side, model meta) into a
`dedn.inference.Predictor`. The names that moved there (`Predictor`, `DataIdentity`,
`class_side_fingerprint`, `IDENTITY_TAGS`, `write_model_files`, `predictor_from_files`,
`read_extra_classes`) are still importable from here.

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
This module imports MLflow; `dedn.tracking` loads it only on use.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.types.schema import ParamSchema, ParamSpec
from mlflow.utils import logging_utils
from torch import nn

from dedn.config import RunConfig
from dedn.data.class_side import ClassSide
from dedn.errors import ConfigError
from dedn.families.base import unwrap_model
from dedn.inference import (
    CLASS_SIDE_FILE, CONFIG_FILE, IDENTITY_TAGS, KINDS, META_FILE, WEIGHTS_FILE, DataIdentity, Predictor,
    class_side_fingerprint, predictor_from_files, read_extra_classes, write_model_files,
)
from dedn.tracking import store as tracking
from dedn.tracking.names import registered_name

__all__ = [
    "CHAMPION", "registered_name", "Predictor", "PyfuncModel", "write_model_files", "log_model",
    "RegisteredVersion", "register_model", "promote_best", "best_version", "competing_versions", "load_predictor",
    "pip_requirements", "read_extra_classes", "DataIdentity", "class_side_fingerprint", "IDENTITY_TAGS", "identity_of",
    "resolve_version", "versions_on_data", "predictor_from_files", "KINDS", "WEIGHTS_FILE", "CONFIG_FILE",
    "CLASS_SIDE_FILE", "META_FILE",
]

CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def identity_of(mv: Any) -> DataIdentity | None:
    """The data identity a registered version (an MLflow ModelVersion) records in its tags, or None."""
    return DataIdentity.from_tags(getattr(mv, "tags", None))


# ---- the pyfunc wrapper (models from code: dedn/tracking/pyfunc_model.py) -------------------
class PyfuncModel(mlflow.pyfunc.PythonModel):
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
def pip_requirements() -> list[str]:
    """Given explicitly: inferring them costs 5-7 s per log_model (docs/stack-notes.md#mlflow-3172). Local labels (+cpu) dropped."""
    reqs = []
    for pkg in ("torch", "numpy", "pyyaml", "mlflow"):
        try:
            reqs.append(f"{pkg}=={md.version(pkg).split('+')[0]}")
        except md.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_model(model: nn.Module, cfg: RunConfig, class_side: ClassSide, *, run_id: str, name: str = "model",
              registered_model_name: str | None = None, input_example: np.ndarray | None = None,
              identity: DataIdentity | None = None) -> Any:
    """Log the network as a models-from-code pyfunc into run `run_id`; returns MLflow's ModelInfo."""
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


def register_model(model: nn.Module, cfg: RunConfig, class_side: ClassSide, *, run_id: str,
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
    c = tracking.client()
    best = None
    for _ in range(attempts):
        best = best_version(c.search_model_versions(f"name='{name}'"))
        if best is None:
            return None
        try:
            c.set_registered_model_alias(name, CHAMPION, best)
        except MlflowException as e:
            if not _lost_alias_race(e):
                raise
            # Another registrant created the alias between the server's look-up and its insert; the
            # alias now exists, so the next attempt updates it. A short random wait breaks the step.
            time.sleep(random.uniform(0.05, 0.25))
            continue
        try:
            now = str(c.get_model_version_by_alias(name, CHAMPION).version)
        except MlflowException:
            now = None
        if now == best and best_version(c.search_model_versions(f"name='{name}'")) == best:
            return best
    return best


def _lost_alias_race(e: MlflowException) -> bool:
    """True for the server's answer when two first writes of one alias met: MLflow's SQL store merges
    an alias with a look-up then an insert, so the second insert breaks the alias table's key."""
    text = str(e).lower()
    return "alias" in text and ("unique" in text or "duplicate key" in text)


# ---- loading ---------------------------------------------------------------------------------
def resolve_version(uri: str) -> tuple[str, str] | None:
    """`models:/name/3` or `models:/name@alias` -> (name, version); None for other URIs or when unknown."""
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
    try:
        versions = tracking.client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return [str(v) for v in sorted(int(mv.version) for mv in versions if identity_of(mv) == identity)]


def load_predictor(uri: str) -> Predictor:
    """`models:/dedn-cub@champion`, `models:/msdn-cub/3`, `runs:/<id>/model` -> Predictor."""
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


