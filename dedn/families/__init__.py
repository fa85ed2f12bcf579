"""Model families: the one place that knows what differs between DEDN, MSDN and any later model.

A family implements a required core (`ModelFamily`, `dedn.families.base`): its config blocks and
presets, its search space, how to build its network for a dataset, its training step (one or
several optimisers, any number of inner steps per batch), its named score parts and the
inference weights fitted post hoc on validation, its loss-part names. What only some families
need it declares as optional capabilities (`dedn.families.capabilities`). The training loop,
tracking, tuning, the registry, plots, ablations, the comparison and heat maps ask the family;
none of them names a family's parts.

Families register by name (`register_family`). The built-in ones are imported on first use;
others are found in the modules named by the environment variable `DEDN_FAMILY_MODULES`
(comma-separated, importable; each registers its families on import) or in the `dedn.families`
entry-point group of installed packages. Ray workers inherit the variable from the driver.
"""
from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import TYPE_CHECKING

from dedn.errors import ConfigError

if TYPE_CHECKING:
    from dedn.config import RunConfig
    from dedn.families.base import ModelFamily

__all__ = ["ModelFamily", "PostHocWeights", "register_family", "get_family", "family_names", "family_of",
           "FAMILY_MODULES_ENV"]

FAMILY_MODULES_ENV = "DEDN_FAMILY_MODULES"
_FAMILIES: dict[str, ModelFamily] = {}
_BUILTIN = ("dedn.families.dedn", "dedn.families.msdn", "dedn.families.d3gzsl")
_loaded = False


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` known under family.name (re-registering the same name replaces it)."""
    if not family.name or not family.name.replace("_", "").isalnum() or family.name != family.name.lower():
        raise ConfigError("model.name", "a lower-case identifier for a family name", family.name, type(family).__name__)
    _FAMILIES[family.name] = family
    return family


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN:
        importlib.import_module(mod)
    extra = [m.strip() for m in os.environ.get(FAMILY_MODULES_ENV, "").split(",") if m.strip()]
    for mod in extra:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(FAMILY_MODULES_ENV, "importable module names (comma-separated)", f"{mod}: {e}",
                              "environment") from None
    for ep in metadata.entry_points(group="dedn.families"):
        ep.load()


def family_names() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_FAMILIES))


def get_family(name: str) -> ModelFamily:
    """The family registered as `name`; a ConfigError naming model.name and the known families otherwise."""
    _load()
    if name not in _FAMILIES:
        raise ConfigError("model.name", "one of " + "|".join(sorted(_FAMILIES)), name)
    return _FAMILIES[name]


def family_of(cfg: "RunConfig") -> ModelFamily:
    return get_family(cfg.model.name)


def __getattr__(name: str):  # the interface imports torch: `dedn.config` and the registry stay light until a family loads
    if name in ("ModelFamily", "PostHocWeights"):
        from dedn.families import base

        return getattr(base, name)
    raise AttributeError(name)
