"""Search spaces of sweeps: one YAML per model family (shipped in its package), validated against its config keys."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from ray import tune

from dedn.config import RunConfig, known_keys, read_yaml_file
from dedn.errors import ConfigError
from dedn.families import get_family


DIM_TYPES = ("uniform", "loguniform", "int", "choice")


def reported_metrics(model: str = "dedn") -> tuple[str, ...]:
    """Metric names a trial's reports carry that a sweep reads and MLflow child runs log
    (EpochReport.metrics of a selection epoch): validation, the family's weights, epoch, loss."""
    return ("val_H", "val_S", "val_U", "val_T", *get_family(model).weight_names, "epoch", "loss", "best_val_H")


@dataclass(frozen=True)
class Dimension:
    """One searched config key: a uniform / log-uniform / integer range or a categorical choice."""

    key: str  # dotted RunConfig key, e.g. "loss.beta"
    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def to_tune(self) -> Any:
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper bound is exclusive
        return tune.choice(list(self.values))

    def corners(self) -> list[Any]:
        """The extreme values (checked against RunConfig when the space is loaded)."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: dimensions, the lambda dimensions, metric/mode and ASHA knobs."""

    dims: tuple[Dimension, ...]
    lambda_dims: tuple[Dimension, ...]
    metric: str = "val_H"
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    source: str = "search space"

    def param_space(self, search_lambdas: bool) -> dict[str, Any]:
        """Tune's param_space: {dotted key: Domain}; lambda dims join only with search_lambdas."""
        dims = self.dims + (self.lambda_dims if search_lambdas else ())
        return {d.key: d.to_tune() for d in dims}

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dims)


def default_space_path(model: str = "dedn") -> Path:
    """The family's search_space.yaml, shipped inside the package (dedn/families/<model>/)."""
    f = get_family(model).search_space_file()
    if f is None:
        raise ConfigError("space", f"a search-space YAML (model {model} ships none)", "none")
    return Path(str(f))


def _parse_dim(key: str, spec: Any, source: str, model: str = "dedn") -> Dimension:
    where = f"space.{key}"
    if key not in known_keys(model):
        raise ConfigError(where, "a dotted RunConfig key (dedn.config.known_keys())", key, source)
    if not isinstance(spec, Mapping):
        raise ConfigError(where, "a mapping {type, low, high} or {type: choice, values}", spec, source)
    kind = spec.get("type")
    if kind not in DIM_TYPES:
        raise ConfigError(f"{where}.type", "one of " + "|".join(DIM_TYPES), kind, source)
    unknown = set(spec) - {"type", "low", "high", "values"}
    if unknown:
        raise ConfigError(where, "only the fields type, low, high, values", sorted(unknown), source)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values", "a non-empty list", values, source)
        dim = Dimension(key, kind, values=tuple(values))
    else:
        lo, hi = spec.get("low"), spec.get("high")
        for name, v in (("low", lo), ("high", hi)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{where}.{name}", "a finite number", v, source)
        if not lo < hi:
            raise ConfigError(where, "low < high", f"low={lo}, high={hi}", source)
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}.low", "> 0 for a loguniform dimension", lo, source)
        if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise ConfigError(where, "integer bounds for an int dimension", f"low={lo}, high={hi}", source)
        dim = Dimension(key, kind, float(lo), float(hi))
    # every extreme value must make a valid RunConfig (e.g. lambda in [0, 1], beta >= 0)
    for v in dim.corners():
        try:
            RunConfig.for_family(model).replace(**{key: int(v) if kind == "int" else v})
        except ConfigError as e:
            raise ConfigError(where, f"values valid for {key} ({e.expected})", v, source) from None
    return dim


def load_search_space(path: str | os.PathLike[str] | None = None, model: str = "dedn") -> SearchSpace:
    """Read and validate a search-space YAML (format: dedn/families/dedn/search_space.yaml); ConfigError names the field.

    Without a path: the default space of `model` (dedn/families/<model>/search_space.yaml).
    """
    path = Path(path) if path is not None else default_space_path(model)
    src = str(path)
    doc = read_yaml_file(path, "space")
    if not isinstance(doc, Mapping):
        raise ConfigError("<root>", "a mapping", type(doc).__name__, src)
    unknown = set(doc) - {"metric", "mode", "space", "lambdas", "asha"}
    if unknown:
        raise ConfigError("<root>", "only the keys metric, mode, space, lambdas, asha", sorted(unknown), src)
    space = doc.get("space") or {}
    lambdas = doc.get("lambdas") or {}
    for name, block in (("space", space), ("lambdas", lambdas)):
        if not isinstance(block, Mapping):
            raise ConfigError(name, "a mapping {dotted key: dimension}", block, src)
    if not space:
        raise ConfigError("space", "at least one dimension", "none", src)
    allowed = {f"eval.{w}" for w in get_family(model).weight_names}
    bad = set(lambdas) - allowed
    if bad:
        raise ConfigError("lambdas", "only the family's weights " + ", ".join(sorted(allowed)), sorted(bad), src)
    both = set(space) & set(lambdas)
    if both:
        raise ConfigError("lambdas", "keys not also under space", sorted(both), src)
    metric = doc.get("metric", "val_H")
    if metric not in reported_metrics(model):
        raise ConfigError("metric", "one of " + "|".join(reported_metrics(model)), metric, src)
    mode = doc.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError("mode", "max or min", mode, src)
    asha = doc.get("asha") or {}
    if not isinstance(asha, Mapping) or set(asha) - {"grace_period", "reduction_factor"}:
        raise ConfigError("asha", "a mapping with grace_period and/or reduction_factor", asha, src)
    grace, rf = asha.get("grace_period", 1), asha.get("reduction_factor", 2)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
        raise ConfigError("asha.grace_period", "an int >= 1", grace, src)
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 1:
        raise ConfigError("asha.reduction_factor", "a number > 1", rf, src)
    return SearchSpace(
        dims=tuple(_parse_dim(k, v, src, model) for k, v in space.items()),
        lambda_dims=tuple(_parse_dim(k, v, src, model) for k, v in lambdas.items()),
        metric=metric, mode=mode, grace_period=grace, reduction_factor=rf, source=src,
    )
