"""Training callbacks: code a run loads by name into each of its workers, to watch or change the run.

A plugin is named `module:attribute` (importable in the driver and in every worker: an installed
package, or a folder on PYTHONPATH, as for `DEDN_FAMILY_MODULES`). The attribute is called with
the plugin's options as keyword arguments and returns a `Callback`, a sequence of them, or None.
Plugins come from `TrainSettings.plugins` ({name: options}) and from the environment variable
`DEDN_TRAIN_PLUGINS` of the driver: comma-separated names (no options), or a JSON object
{name: options}. The driver resolves both, checks that every name imports (preflight, before Ray
or an MLflow run starts) and hands the list to the workers in the loop config, so a plugin set in
the driver after Ray started reaches them too.

In each worker (`dedn.training.driver.train_func`), every callback sees, in plugin order:

* `on_start(ctx)`: before the first epoch; `ctx` says which rank, device and where the worker
  starts (a restart resumes from the last checkpoint: phase and epoch).
* `wrap_model(module)`: the training module of each phase (the family's `wrap`, DDP included),
  before any step; returns the module training uses (the same one, with hooks, or one around it).
* `on_epoch(report, state)`: every epoch's report, before the console, MLflow and Ray Train sinks.
* `around_checkpoint_write(report)`: a context manager around rank 0's write of the epoch's
  checkpoint into the run's storage.
* `on_end(model)`: the trained network of the last phase (unwrapped), once training is over.

The fault-tolerance tests and `tools/soak.py` inject their faults this way (`tests/faults.py`);
nothing of them is in production code.
"""
from __future__ import annotations

import importlib
import json
import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Sequence

from dedn.errors import ConfigError
from dedn.training.report import EpochReport, StateFn

if TYPE_CHECKING:  # no torch at import: the soak and the driver's environment helpers load this module
    import torch
    from torch import nn

    from dedn.config import RunConfig

__all__ = ["PLUGINS_ENV", "Callback", "WorkerContext", "plugin_specs", "resolve_plugin", "load_callbacks",
           "CallbackList"]

PLUGINS_ENV = "DEDN_TRAIN_PLUGINS"


@dataclass(frozen=True)
class WorkerContext:
    """Where a worker stands when training starts."""

    rank: int
    world_size: int
    device: "torch.device"
    cfg: "RunConfig"
    phase: str  # the phase the worker starts in: "select" or "final"
    epoch: int  # the epoch it starts at (after a restart: the last checkpoint's epoch + 1)
    resumed: bool  # started from a checkpoint (Ray's restart, or the same --name again)


class Callback:
    """A training callback: override what you need; every hook does nothing by default."""

    def on_start(self, ctx: WorkerContext) -> None:
        """Before the first epoch of this worker."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The training module of a phase (DDP included) -> the module the steps call."""
        return model

    def on_epoch(self, report: EpochReport, state: StateFn) -> None:
        """Every epoch's report; `state()` is the checkpoint dict (a copy: costly, call it only when needed)."""

    def around_checkpoint_write(self, report: EpochReport) -> ContextManager[None]:
        """Entered around rank 0's write of `report`'s checkpoint into the run's storage."""
        return nullcontext()

    def on_end(self, model: nn.Module) -> None:
        """The trained network of the last phase, on its device, after the last epoch."""


def _where(key: str) -> str:
    return {PLUGINS_ENV: "environment", "plugins": "train_loop_config"}.get(key, "TrainSettings")


def _parse_env(value: str) -> dict[str, dict[str, Any]]:
    value = value.strip()
    if not value:
        return {}
    if value.startswith("{"):
        try:
            got = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(PLUGINS_ENV, "module:callable names (comma-separated) or a JSON object {name: options}",
                              f"{value[:80]} ({e})", "environment") from None
        if not all(isinstance(v, dict) for v in got.values()):
            raise ConfigError(PLUGINS_ENV, "a JSON object of option objects {name: {...}}", value[:80], "environment")
        return {str(k): dict(v) for k, v in got.items()}
    return {name.strip(): {} for name in value.split(",") if name.strip()}


def plugin_specs(plugins: Mapping[str, Mapping[str, Any]] | None = None, environ: Mapping[str, str] | None = None,
                 *, check: bool = False) -> dict[str, dict[str, Any]]:
    """The run's plugins in order: `plugins` (TrainSettings), then those of DEDN_TRAIN_PLUGINS not named there.

    Options must be JSON-able (they travel to the workers in the loop config). check: import each
    name here (the driver's preflight), a ConfigError naming the setting or the variable otherwise."""
    env = os.environ if environ is None else environ
    out = {str(k): dict(v or {}) for k, v in (plugins or {}).items()}
    if check:
        for name in out:
            resolve_plugin(name, "settings.plugins")
    for name, options in _parse_env(env.get(PLUGINS_ENV, "")).items():
        if name not in out:
            if check:
                resolve_plugin(name, PLUGINS_ENV)
            out[name] = options
    try:
        json.dumps(out)
    except (TypeError, ValueError) as e:
        raise ConfigError("settings.plugins", "JSON-able options", f"{out!r:.120} ({e})", "TrainSettings") from None
    return out


def resolve_plugin(name: str, key: str = "settings.plugins") -> Callable[..., Any]:
    """The callable a plugin name `module:attribute` stands for; a ConfigError naming `key` otherwise."""
    mod, sep, attr = name.partition(":")
    if not (mod and sep and attr):
        raise ConfigError(key, "module:callable", name, _where(key))
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise ConfigError(key, "an importable module:callable (on PYTHONPATH, or installed)", f"{name}: {e}",
                          _where(key)) from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ConfigError(key, "module:callable naming a callable", f"{name}: no callable {attr} in {mod}", _where(key))
    return obj


def load_callbacks(specs: Mapping[str, Mapping[str, Any]]) -> list[Callback]:
    """Import and call each plugin with its options; the callbacks they return, in order."""
    out: list[Callback] = []
    for name, options in specs.items():
        got = resolve_plugin(name, "plugins")(**dict(options))
        if got is None:
            continue
        for cb in (got if isinstance(got, (list, tuple)) else [got]):
            out.append(cb)
    return out


class CallbackList:
    """The worker's callbacks as one: each hook calls every callback in order."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def on_start(self, ctx: WorkerContext) -> None:
        for cb in self.callbacks:
            cb.on_start(ctx)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        for cb in self.callbacks:
            model = cb.wrap_model(model)
        return model

    def on_epoch(self, report: EpochReport, state: StateFn) -> None:
        for cb in self.callbacks:
            cb.on_epoch(report, state)

    @contextmanager
    def around_checkpoint_write(self, report: EpochReport) -> Iterator[None]:
        with ExitStack() as stack:
            for cb in self.callbacks:
                stack.enter_context(cb.around_checkpoint_write(report))
            yield

    def on_end(self, model: nn.Module) -> None:
        for cb in self.callbacks:
            cb.on_end(model)
