"""Typed configuration: defaults <- preset YAML (with its variant block) <- command-line `key=value`.

The merged `RunConfig` is what a run logs, stores in its checkpoints and what Ray Tune's
search space overrides (through the same dotted keys). Its `model`, `loss` and `eval` blocks are
the run's family's (`dedn.families`); the common sections and `check` are `dedn.config_sections`
(re-exported here), which the families build their own blocks on.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from dedn.config_sections import (
    PRESETS, VARIANTS, DataConfig, EvalConfig, OptimConfig, TrainConfig, Variant, check,
)
from dedn.errors import ConfigError
from dedn.families import family_names, get_family
from dedn.families.capabilities import section_aliases

__all__ = [
    "PRESETS", "VARIANTS", "Variant", "check", "OptimConfig", "DataConfig", "TrainConfig", "EvalConfig", "RunConfig",
    "section_types", "known_keys", "resolve_key", "RENAMED_KEYS", "apply_overrides", "parse_overrides", "available_presets",
    "preset_path", "load_preset", "cub", "sun", "awa2", "read_yaml_file", "build_config", "config_for_dataset",
]


@dataclass(frozen=True)
class RunConfig:
    """A whole run of any family: which dataset preset, which variant and protocol, and every section."""

    dataset: str = "CUB"
    variant: Variant = "paper"
    protocol: Literal["two_phase", "select", "final"] = "two_phase"
    # model / loss / eval: the blocks of the family named by model.name (dedn.families)
    model: Any = field(default_factory=lambda: get_family("dedn").model_config())
    loss: Any = field(default_factory=lambda: get_family("dedn").loss_config())
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Any = field(default_factory=lambda: get_family("dedn").eval_config())

    def __post_init__(self) -> None:
        check(self.variant in VARIANTS, "variant", "one of paper|reference", self.variant)
        check(self.protocol in ("two_phase", "select", "final"), "protocol", "one of two_phase|select|final", self.protocol)

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
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "RunConfig":
        return apply_overrides(cls(), _flatten(d, source), source=source)

    @classmethod
    def for_family(cls, name: str) -> "RunConfig":
        """The defaults of family `name` (its model, loss and eval blocks)."""
        fam = get_family(name)
        return cls(model=fam.model_config(), loss=fam.loss_config(), eval=fam.eval_config())

    def replace(self, **dotted: Any) -> "RunConfig":
        """Copy with dotted-key changes: cfg.replace(**{'loss.beta': 0.01})."""
        return apply_overrides(self, dotted, source="replace")


# ---- overrides -------------------------------------------------------------------------
class _Shown(str):
    """A found value described with its kind ("a list [1, 2]"): a ConfigError shows it as is, unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _found(value: Any, kind_always: bool = False) -> Any:
    """`value` for a ConfigError's `found`: lists and mappings named as such ("a mapping {'a': 1}"); with
    kind_always (where a mapping was expected) scalars too ("a number 3", "a string 'fast'")."""
    if isinstance(value, Mapping):
        return _Shown(f"a mapping {dict(value)!r}")
    if isinstance(value, (list, tuple, set)):
        return _Shown(f"a list {list(value)!r}")
    if not kind_always:
        return value
    if value is None:
        return _Shown("null")
    if isinstance(value, bool):
        return _Shown(f"a boolean {str(value).lower()}")
    if isinstance(value, (int, float)):
        return _Shown(f"a number {value!r}")
    if isinstance(value, str):
        return _Shown(f"a string {value!r}")
    return _Shown(f"a {type(value).__name__} {value!r}")


def _doc_model(d: Mapping[str, Any]) -> str:
    """The family a config document names (model: {name: ...}, model: NAME or model.name), else dedn."""
    m = d.get("model", d.get("model.name"))
    if isinstance(m, Mapping):
        m = m.get("name")
    return m if isinstance(m, str) and m else "dedn"


def _sections(model: str) -> dict[str, type]:
    """{section or a family's alias of one: its dataclass}; DEDN's sections when `model` is unknown (the
    unknown model.name is reported where the config is applied)."""
    try:
        types = section_types(model)
    except ConfigError:
        types = section_types("dedn")
    out = dict(types)
    for name in family_names():  # every family's aliases: a file of one family read before its model is known
        for alias, sec in section_aliases(get_family(name)).items():
            out.setdefault(alias, section_types(name)[sec])
    return out


def _flatten(d: Any, source: str, model: str | None = None) -> dict[str, Any]:
    """A config document ({section: {key: value}, top key: value}) as dotted keys -> values.

    A section must be a mapping of its keys (empty: nothing to change; `model` may also be the
    model's name alone); a value standing where a key's value belongs stays as given, so that the
    key's own check names its type ("optim.lr: expected a finite number, found a mapping ...").
    """
    if not isinstance(d, Mapping):
        raise ConfigError("<root>", f"a mapping of sections ({', '.join(section_types('dedn'))})",
                          _found(d, kind_always=True), source)
    model = model or _doc_model(d)
    sections = _sections(model)
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = str(k)
        if key not in sections or (key == "model" and isinstance(v, str)):  # a top key, a leaf name, model: NAME
            out[key] = v
            continue
        if v is None:  # every key of the section left out (commented out)
            continue
        if not isinstance(v, Mapping):
            names = [f.name for f in fields(sections[key])]
            expected = f"a mapping of {key} keys ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
            raise ConfigError(key, ("a model name or " if key == "model" else "") + expected,
                              _found(v, kind_always=True), source)
        for kk, vv in v.items():
            out[f"{key}.{kk}"] = vv
    return out


_COMMON_SECTIONS = {"optim": OptimConfig, "data": DataConfig, "train": TrainConfig}
_TOP_KEYS = ("dataset", "variant", "protocol")


def section_types(model: str = "dedn") -> dict[str, type]:
    """{section: dataclass} of a run of family `model`."""
    fam = get_family(model)
    return {"model": fam.model_config, "loss": fam.loss_config, "optim": OptimConfig, "data": DataConfig,
            "train": TrainConfig, "eval": fam.eval_config}


def known_keys(model: str = "dedn") -> list[str]:
    """Every dotted key of a run config of family `model`."""
    keys = list(_TOP_KEYS)
    for sec, typ in section_types(model).items():
        keys += [f"{sec}.{f.name}" for f in fields(typ)]
    return keys


# Keys renamed when the eval block became family-neutral (a family's post-hoc weights are not all
# lambdas: MSDN's w1, D3GZSL's w_student). Saved configs (checkpoints, registered models, sweeps),
# YAML files and command lines written before still load: the old key, dotted or as a leaf name,
# sets the new one, with one warning naming it. FutureWarning, not DeprecationWarning: the reader is
# whoever wrote the config, and Python shows FutureWarning by default; warned from this one line, so
# Python's registry shows each message (source and key) once per process, whichever path resolved it.
RENAMED_KEYS = {"eval.fit_lambdas": "eval.fit_weights", "eval.lambda_grid_step": "eval.weight_grid_step"}
_RENAMED = {**RENAMED_KEYS, **{old.split(".", 1)[1]: new for old, new in RENAMED_KEYS.items()}}


def resolve_key(key: str, source: str = "overrides", model: str = "dedn") -> str:
    """Accept dotted keys, unique leaf names (`beta=`), `model=NAME` as model.name, the family's
    section aliases (D3GZSL: `d3.enabled` is `loss.enabled`) and the old names of renamed keys
    (`RENAMED_KEYS`, with a FutureWarning naming the new key)."""
    keys = known_keys(model)
    if key in keys:
        return key
    if key in _RENAMED:
        warnings.warn(f"{source}: {key} is deprecated: use {_RENAMED[key]}", FutureWarning, stacklevel=1)
        return _RENAMED[key]
    head, dot, leaf = key.partition(".")
    aliases = section_aliases(get_family(model))
    if dot and head in aliases and f"{aliases[head]}.{leaf}" in keys:
        return f"{aliases[head]}.{leaf}"
    if key == "model":
        return "model.name"
    matches = [k for k in keys if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(key, f"an unambiguous key (one of {', '.join(matches)})", key, source)
    sec = aliases.get(key, key)
    if sec in section_types(model):  # a section given a value: `loss=3`
        names = [f.name for f in fields(section_types(model)[sec])]
        raise ConfigError(key, f"a key of section {key} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}), "
                          f"e.g. {key}.{names[0]}=...", key, source)
    raise ConfigError(key, f"a known key of model {model} (see `dedn.config.known_keys({model!r})`)", key, source)


def _field_type(key: str, model: str) -> Any:
    if "." not in key:
        return typing.get_type_hints(RunConfig)[key]
    sec, leaf = key.split(".", 1)
    return typing.get_type_hints(section_types(model)[sec])[leaf]


def _coerce(key: str, value: Any, source: str, model: str) -> Any:
    typ = _field_type(key, model)
    try:
        return _coerce_value(key, typ, value, source)
    except ConfigError as e:
        raise ConfigError(e.key, e.expected, _found(e.found), e.source) from None


def _coerce_value(key: str, typ: Any, value: Any, source: str) -> Any:
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


def _model_name(overrides: Mapping[str, Any], default: str) -> str:
    for k in ("model.name", "model", "name"):
        if k in overrides:
            return str(overrides[k])
    return default


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any], source: str = "overrides") -> RunConfig:
    """Return cfg with dotted-key overrides applied; unknown keys and bad values raise ConfigError.

    A different model.name switches the model, loss and eval blocks to that family's defaults
    first (the other family's keys mean nothing to it); the remaining overrides then apply.
    """
    model = _model_name(overrides, cfg.model.name)
    if model != cfg.model.name:
        get_family(model)  # ConfigError naming model.name and the known families
        fresh = RunConfig.for_family(model)
        cfg = dataclasses.replace(cfg, model=fresh.model, loss=fresh.loss, eval=fresh.eval)
    top: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {}
    for raw_key, raw_value in overrides.items():
        key = resolve_key(raw_key, source, model)
        value = _coerce(key, raw_value, source, model)
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
            raise ConfigError(a, "key=value", a, "overrides")
        k, v = a.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# ---- presets ---------------------------------------------------------------------------
def available_presets(model: str = "dedn") -> tuple[str, ...]:
    """The datasets family `model` ships presets for ("awa2", "cub", "sun")."""
    return get_family(model).presets()


def preset_path(name: str, model: str = "dedn") -> Path:
    f = get_family(model).preset_file(name)
    if f is None:
        raise ConfigError("preset", f"one of {'|'.join(available_presets(model))} (presets of model {model})", name)
    return Path(str(f))


def load_preset(name: str, variant: str | None = None, model: str = "dedn", *, variant_source: str = "overrides"
                ) -> RunConfig:
    """Family `model`'s settings for a dataset; `variant='reference'` applies the preset's reference block.

    A preset without a block for the variant keeps its own settings (MSDN has a single form).
    `variant_source` names where `variant` came from (the command line, a config file) in its error.
    """
    if name.lower() not in available_presets(model):
        raise ConfigError("preset", f"one of {'|'.join(available_presets(model))} (presets of model {model})", name)
    path = preset_path(name, model)
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    variants = doc.pop("variants", {}) or {}
    cfg = apply_overrides(RunConfig.for_family(model), _flatten(doc, str(path), model), source=str(path))
    variant = variant or cfg.variant
    if variant not in VARIANTS:
        raise ConfigError("variant", "one of paper|reference", _found(variant), variant_source)
    block = variants.get(variant, {}) or {}
    return apply_overrides(cfg, {"variant": variant, **_flatten(block, str(path), model)}, source=f"{path} [variants.{variant}]")


def cub(variant: str = "paper") -> RunConfig:
    return load_preset("cub", variant)


def sun(variant: str = "paper") -> RunConfig:
    return load_preset("sun", variant)


def awa2(variant: str = "paper") -> RunConfig:
    return load_preset("awa2", variant)


def read_yaml_file(path: str | os.PathLike[str], key: str = "--config") -> Any:
    """A user's YAML file (`key` names the option that gave it); a missing, unreadable or malformed
    file is one ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(key, "a readable YAML file", f"{path}: {e.strerror or e}", "config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(key, "valid YAML", f"{path}{at}: {problem}", "config") from None


def build_config(preset: str | None, overrides: Mapping[str, Any] | Sequence[str] = (), config_file: str | None = None) -> RunConfig:
    """defaults <- preset YAML (and its variant block) <- optional YAML file <- key=value overrides.

    The variant is read from the overrides first, so `variant=reference` on the command line
    selects the preset's reference block before the other overrides apply.
    """
    ov = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    file_over: dict[str, Any] = {}
    if config_file:
        file_over = _flatten(read_yaml_file(config_file), config_file)
    variant = ov.get("variant", file_over.get("variant"))
    model = str(_model_name(ov, _model_name(file_over, "dedn")))
    where = "overrides" if "variant" in ov else (config_file or "config file")
    cfg = load_preset(preset, variant, model, variant_source=where) if preset else RunConfig.for_family(model)
    if file_over:
        cfg = apply_overrides(cfg, file_over, source=config_file or "config file")
    return apply_overrides(cfg, ov)


def config_for_dataset(dataset_name: str, data_path: str, preset: str | None = None,
                       overrides: Mapping[str, Any] | Sequence[str] = (), config_file: str | None = None) -> RunConfig:
    """The run config of a job on a dataset directory: `preset`, else the dataset's own preset
    when its name has one (and no config file is given), else the defaults named after the dataset.

    Every job that trains on `--data DIR` builds its config here, so a dataset without a preset
    (APY, your own) runs with the defaults instead of failing the dataset-name check.
    """
    ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    own = dataset_name.lower() in available_presets(_model_name(ov, "dedn"))
    name = (preset or (dataset_name.lower() if own and not config_file else "")) or None
    named = {} if name or config_file else {"dataset": dataset_name}
    return build_config(name, {**named, **ov, "data.path": str(data_path)}, config_file=config_file)



def __getattr__(name: str) -> Any:
    # The run config was called DEDNConfig while DEDN was the only family. Checkpoints, registered models
    # and Ray's payloads hold it as a plain dict (to_dict), but user code and anything pickled by class
    # path may still name it: `dedn.config.DEDNConfig` stays importable, and says once what it is now.
    if name == "DEDNConfig":
        global _warned_dedn_config
        if not _warned_dedn_config:
            _warned_dedn_config = True
            warnings.warn("dedn.config.DEDNConfig is deprecated: use dedn.config.RunConfig", DeprecationWarning,
                          stacklevel=2)
        return RunConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_warned_dedn_config = False
