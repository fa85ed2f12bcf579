"""Typed configuration: defaults <- preset YAML (with its variant block) <- command-line `key=value`.

The merged `DEDNConfig` is what a run logs, stores in its checkpoints and what Ray Tune's
search space overrides (through the same dotted keys).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from dedn.errors import ConfigError

Variant = Literal["paper", "reference"]
VARIANTS = ("paper", "reference")
PRESETS = ("cub", "sun", "awa2")


def _check(cond: bool, key: str, expected: str, found: Any) -> None:
    if not cond:
        raise ConfigError(key, expected, found)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model (DEDN by default)."""

    name: str = "dedn"  # key in dedn.models' builder table
    experts: Literal["both", "coarse", "fine"] = "both"  # Table 3: cExp only / fExp only
    channel_attention: bool = True  # Table 3: "DAN w/o CA"
    clusters: Literal["manual", "halved", "kmeans"] = "manual"  # Figure 5 studies
    num_clusters: int = 0  # kmeans only; 0 = as many clusters as the manual division
    region_rank: int = 0  # >0: low-rank region map V W1a W1b F (reference code, SUN: 256)
    normalize_features: bool = True  # L2 over channels per region, as the reference code does
    normalize_word_vectors: bool = False  # MSDN on AWA2: re-normalise V's rows at every forward

    def __post_init__(self) -> None:
        _check(self.experts in ("both", "coarse", "fine"), "model.experts", "one of both|coarse|fine", self.experts)
        _check(self.clusters in ("manual", "halved", "kmeans"), "model.clusters", "one of manual|halved|kmeans", self.clusters)
        _check(self.num_clusters >= 0, "model.num_clusters", ">= 0", self.num_clusters)
        _check(self.region_rank >= 0, "model.region_rank", ">= 0", self.region_rank)


@dataclass(frozen=True)
class LossConfig:
    """Training objective, eqs. 15-18 (paper) or the reference code's form."""

    beta: float = 1e-3  # weight of the region/channel alignment terms (eq. 16, 17)
    gamma: float = 0.1  # weight of the expert distillation term (eq. 18)
    epsilon: float = 1.0  # MAL margin (eq. 15)
    mal: bool = True  # False: plain cross-entropy (Table 3 "w/o L_mal")
    align: bool = True  # False: Table 3 "w/o L_align"
    distill: bool = True  # False: Table 3 "w/o L_distill"
    # JSD plus: mean squared error (paper text), summed squared error (eqs. 7/12 as typeset), cubic (reference)
    distance: Literal["mse", "sse", "cubic"] = "mse"
    calibration_weight: float = 0.0  # reference code's self-calibration term (DAZLE); 0 = off
    reference_margin: float = 3.0  # reference MAL margin m with the +-1 bias (m = 3 equals epsilon = 1)

    def __post_init__(self) -> None:
        for key in ("beta", "gamma", "epsilon", "calibration_weight", "reference_margin"):
            v = getattr(self, key)
            _check(isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf"), f"loss.{key}", "a finite number >= 0", v)
        _check(self.distance in ("mse", "sse", "cubic"), "loss.distance", "one of mse|sse|cubic", self.distance)


@dataclass(frozen=True)
class OptimConfig:
    """RMSprop as in the paper; epochs and batch size."""

    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    alpha: float = 0.99
    batch_size: int = 50
    epochs: int = 20
    max_steps_per_epoch: int = 0  # 0 = a full pass over the training split
    grad_clip: float = 0.0  # 0 = no clipping (the paper does not clip)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "> 0", self.lr)
        _check(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _check(0 < self.alpha < 1, "optim.alpha", "in (0, 1)", self.alpha)
        _check(self.batch_size >= 1, "optim.batch_size", ">= 1", self.batch_size)
        _check(self.epochs >= 1, "optim.epochs", ">= 1", self.epochs)
        _check(self.max_steps_per_epoch >= 0, "optim.max_steps_per_epoch", ">= 0", self.max_steps_per_epoch)
        _check(self.grad_clip >= 0, "optim.grad_clip", ">= 0", self.grad_clip)


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset directory is and how it is streamed."""

    path: str = ""  # dataset directory (dataset.json); jobs make a demo dataset when empty
    class_balanced: bool = True  # reference: CUB/AWA2 balanced batches, SUN uniform
    shuffle_buffer: int = 4096  # rows held by the reader's shuffle buffer ...
    shuffle_buffer_mib: int = 1024  # ... at most this much feature storage: 14x14 maps hold 4x fewer rows
    loader_workers: int = 0  # DataLoader worker processes per training worker

    def __post_init__(self) -> None:
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1", self.shuffle_buffer)
        _check(self.shuffle_buffer_mib >= 1, "data.shuffle_buffer_mib", ">= 1", self.shuffle_buffer_mib)
        _check(self.loader_workers >= 0, "data.loader_workers", ">= 0", self.loader_workers)

    def shuffle_rows(self, row_bytes: int) -> int:
        """Rows of the shuffle buffer for rows of `row_bytes` stored bytes: the row count, capped by the MiB budget.

        Keeps a worker's memory independent of the feature-map size (CUB 2048x7x7 fp16: 4096
        rows, 0.8 GiB; 2048x14x14: 1337 rows, 1 GiB). At least one row.
        """
        return max(1, min(self.shuffle_buffer, (self.shuffle_buffer_mib << 20) // max(1, int(row_bytes))))


@dataclass(frozen=True)
class EvalConfig:
    """Inference combination (eqs. 8, 19) and how it is chosen on validation."""

    lambda_rc: float = 0.8  # region vs channel output (eq. 8)
    lambda_e: float = 0.9  # cExp vs fExp scores (eq. 19)
    calibration: float = 0.0  # calibrated stacking: subtracted from seen-class scores at evaluation
    fit_lambdas: bool = True  # refit (lambda_rc, lambda_e) on validation outputs each epoch
    lambda_grid_step: float = 0.05
    batch_size: int = 200

    def __post_init__(self) -> None:
        _check(0 <= self.lambda_rc <= 1, "eval.lambda_rc", "in [0, 1]", self.lambda_rc)
        _check(0 <= self.lambda_e <= 1, "eval.lambda_e", "in [0, 1]", self.lambda_e)
        _check(self.calibration == self.calibration, "eval.calibration", "a number", self.calibration)
        _check(0 < self.lambda_grid_step <= 0.5, "eval.lambda_grid_step", "in (0, 0.5]", self.lambda_grid_step)
        _check(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)


@dataclass(frozen=True)
class DEDNConfig:
    """A whole run: which dataset preset, which variant and protocol, and every section."""

    dataset: str = "CUB"
    variant: Variant = "paper"
    protocol: Literal["two_phase", "select", "final"] = "two_phase"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(self.variant in VARIANTS, "variant", "one of paper|reference", self.variant)
        _check(self.protocol in ("two_phase", "select", "final"), "protocol", "one of two_phase|select|final", self.protocol)

    # ---- conversions ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'loss.beta': 0.001, ...} (MLflow params, Tune keys)."""
        out: dict[str, Any] = {}
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "DEDNConfig":
        return apply_overrides(cls(), _flatten(d, source), source=source)

    def replace(self, **dotted: Any) -> "DEDNConfig":
        """Copy with dotted-key changes: cfg.replace(**{'loss.beta': 0.01})."""
        return apply_overrides(self, dotted, source="replace")


# ---- overrides -------------------------------------------------------------------------
def _flatten(d: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(d, Mapping):
        raise ConfigError(prefix or "<root>", "a mapping", d, source)
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, source, key + "."))
        else:
            out[key] = v
    return out


_SECTION_TYPES = {"model": ModelConfig, "loss": LossConfig, "optim": OptimConfig, "data": DataConfig, "eval": EvalConfig}
_TOP_KEYS = ("dataset", "variant", "protocol")


def known_keys() -> list[str]:
    keys = list(_TOP_KEYS)
    for sec, typ in _SECTION_TYPES.items():
        keys += [f"{sec}.{f.name}" for f in fields(typ)]
    return keys


def resolve_key(key: str, source: str = "command line") -> str:
    """Accept dotted keys, unique leaf names (`beta=`) and `model=NAME` as model.name."""
    if key in known_keys():
        return key
    if key == "model":
        return "model.name"
    matches = [k for k in known_keys() if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(key, f"an unambiguous key (one of {', '.join(matches)})", key, source)
    raise ConfigError(key, "a known key (see `dedn.config.known_keys()`)", key, source)


def _field_type(key: str) -> Any:
    if "." not in key:
        return {f.name: f.type for f in fields(DEDNConfig)}[key]
    sec, leaf = key.split(".", 1)
    hints = typing.get_type_hints(_SECTION_TYPES[sec])
    return hints[leaf]


def _coerce(key: str, value: Any, source: str) -> Any:
    if key in _TOP_KEYS:
        typ = typing.get_type_hints(DEDNConfig)[key]
    else:
        typ = _field_type(key)
    if isinstance(value, str) and typ is not str and typing.get_origin(typ) is not Literal:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(key, f"a value of type {getattr(typ, '__name__', typ)}", value, source) from None
    if typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(key, "one of " + "|".join(map(str, choices)), value, source)
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, "true or false", value, source)
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, "an integer", value, source)
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, "a number", value, source) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(key, "a finite number", value, source)
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, "a string", value, source)
        return str(value)
    return value


def apply_overrides(cfg: DEDNConfig, overrides: Mapping[str, Any], source: str = "command line") -> DEDNConfig:
    """Return cfg with dotted-key overrides applied; unknown keys and bad values raise ConfigError."""
    top: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {}
    for raw_key, raw_value in overrides.items():
        key = resolve_key(raw_key, source)
        value = _coerce(key, raw_value, source)
        if "." in key:
            sec, leaf = key.split(".", 1)
            per_section.setdefault(sec, {})[leaf] = value
        else:
            top[key] = value
    try:
        for sec, changes in per_section.items():
            top[sec] = dataclasses.replace(getattr(cfg, sec), **changes)
        return dataclasses.replace(cfg, **top)
    except ConfigError as e:
        raise ConfigError(e.key, e.expected, e.found, source) from None


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """['loss.beta=0.01', 'epochs=3'] -> {'loss.beta': '0.01', 'epochs': '3'}."""
    out: dict[str, str] = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(a, "key=value", a, "command line")
        k, v = a.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ---- presets ---------------------------------------------------------------------------
def preset_name(dataset: str, model: str = "dedn") -> str:
    """The preset file stem of a model on a dataset: "cub" for DEDN, "msdn_cub" for MSDN.

    Every model other than DEDN keeps its authors' settings in `presets/<model>_<dataset>.yaml`.
    """
    d = dataset.lower()
    if model == "dedn" or d.startswith(f"{model}_"):
        return d
    return f"{model}_{d}"


def available_presets() -> tuple[str, ...]:
    """Every preset shipped in dedn/presets ("awa2", "cub", "msdn_cub", ...)."""
    folder = resources.files("dedn") / "presets"
    return tuple(sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")))


def preset_path(name: str) -> Path:
    return Path(str(resources.files("dedn") / "presets" / f"{name.lower()}.yaml"))


def load_preset(name: str, variant: str | None = None) -> DEDNConfig:
    """The paper's settings for a dataset; `variant='reference'` applies the preset's reference block.

    `name` is a dataset ("cub") or a model's preset ("msdn_cub"); a preset without a block
    for the variant keeps its own settings (MSDN has a single form).
    """
    path = preset_path(name)
    if name.lower() not in available_presets():
        raise ConfigError("preset", "one of " + "|".join(available_presets()), name, "command line")
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    variants = doc.pop("variants", {}) or {}
    cfg = apply_overrides(DEDNConfig(), _flatten(doc, str(path)), source=str(path))
    variant = variant or cfg.variant
    if variant not in VARIANTS:
        raise ConfigError("variant", "one of paper|reference", variant, "command line")
    block = variants.get(variant, {}) or {}
    cfg = apply_overrides(cfg, {"variant": variant, **_flatten(block, str(path))}, source=f"{path} [variants.{variant}]")
    return cfg


def cub(variant: str = "paper") -> DEDNConfig:
    return load_preset("cub", variant)


def sun(variant: str = "paper") -> DEDNConfig:
    return load_preset("sun", variant)


def awa2(variant: str = "paper") -> DEDNConfig:
    return load_preset("awa2", variant)


def build_config(preset: str | None, overrides: Mapping[str, Any] | Sequence[str] = (), config_file: str | None = None) -> DEDNConfig:
    """defaults <- preset YAML (and its variant block) <- optional YAML file <- key=value overrides.

    The variant is read from the overrides first, so `variant=reference` on the command line
    selects the preset's reference block before the other overrides apply.
    """
    ov = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    file_over: dict[str, Any] = {}
    if config_file:
        with open(config_file) as f:
            file_over = _flatten(yaml.safe_load(f) or {}, config_file)
    variant = ov.get("variant", file_over.get("variant"))
    named = {resolve_key(k): v for k, v in ov.items() if k in ("model", "name", "model.name")}
    model = named.get("model.name", file_over.get("model.name", "dedn"))
    cfg = load_preset(preset_name(preset, str(model)), variant) if preset else DEDNConfig()
    if file_over:
        cfg = apply_overrides(cfg, file_over, source=config_file or "config file")
    return apply_overrides(cfg, ov)


def config_for_dataset(dataset_name: str, data_path: str, preset: str | None = None,
                       overrides: Mapping[str, Any] | Sequence[str] = (), config_file: str | None = None) -> DEDNConfig:
    """The run config of a job on a dataset directory: `preset`, else the dataset's own preset
    when its name has one (and no config file is given), else the defaults named after the dataset.

    Every job that trains on `--data DIR` builds its config here, so a dataset without a preset
    (APY, your own) runs with the defaults instead of failing the dataset-name check.
    """
    ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    name = (preset or (dataset_name.lower() if dataset_name.lower() in PRESETS and not config_file else "")) or None
    named = {} if name or config_file else {"dataset": dataset_name}
    return build_config(name, {**named, **ov, "data.path": str(data_path)}, config_file=config_file)

