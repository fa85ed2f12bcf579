"""The model-family interface: `ModelFamily` (the required core) and what the training loop hands it.

The required core, what every family implements (docs/design.md#model-families):

* identity: `name` (the `model.name` value) and `title` (captions);
* config blocks: `model_config` and `loss_config`, the dataclasses of the run config's `model` and
  `loss` blocks, and `weights`, the post-hoc inference weights with their defaults, from which the
  `eval` block is derived (`eval_config`: `EvalConfig`, or the family's `eval_base`, plus one float
  in [0, 1] per weight); presets in the family's package folder `presets/<dataset>.yaml`, its
  default search space in `search_space.yaml`;
* `build(cfg, class_side, feature_shape, meta)` -> nn.Module;
* `optimizers(cfg, model)` -> {name: optimizer} (default: one RMSprop, the paper's);
* the training step: `loss(out, labels, protocol, cfg)` for the default `train_step` (forward ->
  `loss` -> backward -> clip -> every optimiser steps), or `train_step(model, x, y, ctx)` itself
  (any number of forward/backward/step calls); either returns the `loss_parts` it names, as floats
  (`ctx.check_finite` turns tensors into floats and stops on NaN/inf);
* `score_parts(out, class_attributes=None)` -> {part: (B, K)} float32 class scores, linear pieces of
  the inference score, and `coefficients(cfg, weights, names)`, the factor of each part at one
  setting of the weights: inference scores = sum_p coefficient_p * part_p (`combine`);
  `weight_grid(cfg)` the values each weight is searched on (default: the eval.weight_grid_step grid).

Defaults a family may override: `resolve` (dataset-dependent settings, before a run), `model_meta`
(what a saved model needs besides its weights to be rebuilt, passed back to `build` as meta),
`describe` (a caption).

What only some families need is an optional capability, declared by subclassing it
(`dedn.families.capabilities`: phase preparation, before-evaluation refits, new-class refits, DDP
wrapping, attention maps, section aliases). Ablation settings are registered with the analysis
that runs them (`dedn.analysis.ablation.register_ablations`), not here.
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dedn.accel import autocast
from dedn.config_sections import EvalConfig, check, check_weight_grid_step
from dedn.errors import NonFiniteLossError

if TYPE_CHECKING:
    from dedn.data.class_side import ClassSide
    from dedn.config import RunConfig
    from dedn.data.reader import Batch
    from dedn.protocol import ClassProtocol

__all__ = ["ModelFamily", "PhaseData", "PostHocWeights", "StepContext", "unwrap_model", "weight_grid_values"]


def weight_grid_values(step: float) -> tuple[float, ...]:
    """0, step, 2 step, ..., 1 (1 always included), rounded so 0.05 * 3 prints as 0.15; step as
    eval.weight_grid_step allows (`dedn.config_sections.MAX_WEIGHT_GRID_STEP`)."""
    check_weight_grid_step(step)
    n = int(math.floor(1.0 / step + 1e-9))
    vals = [round(i * step, 10) for i in range(n + 1)]
    if vals[-1] < 1.0:
        vals.append(1.0)
    return tuple(vals)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a DDP (or similar) wrapper (`WrapsForDDP.wrap`); the model itself otherwise."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@dataclass(frozen=True)
class PostHocWeights:
    """The inference weights of one run and the values each is searched on (one value = fixed)."""

    names: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.values)

    def points(self) -> list[dict[str, float]]:
        """Every grid point as {name: value}, last name fastest (row-major over `shape`)."""
        out: list[dict[str, float]] = [{}]
        for name, vals in zip(self.names, self.values):
            out = [{**p, name: v} for p in out for v in vals]
        return out


@dataclass
class StepContext:
    """What one training step needs besides the batch; the loop fills it."""

    cfg: "RunConfig"
    protocol: "ClassProtocol"
    optimizers: Mapping[str, torch.optim.Optimizer]
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    epoch: int = 0
    step: int = 0  # 1-based step within the epoch

    def autocast(self) -> AbstractContextManager[object]:
        return autocast(self.device, self.autocast_dtype)

    def check_finite(self, parts: Mapping[str, Tensor]) -> dict[str, float]:
        """Loss parts as floats (one host sync); NonFiniteLossError naming epoch, step and parts on NaN/inf."""
        values = dict(zip(parts, torch.stack([v.detach().float() for v in parts.values()]).tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLossError(self.epoch, self.step, values)
        return values


@dataclass
class PhaseData:
    """A phase's training split for a family's own passes over it (`PreparesPhases.prepare`,
    `RefitsBeforeEval.before_eval`).

    `read()` yields every row of the split once, in file order, the same rows on every rank (not
    the rank's share), so anything fitted on it is identical across ranks without communication.
    `cache` is the family's to keep what it derived (pooled features) for the rest of the phase.
    """

    phase: str
    split: str
    protocol: "ClassProtocol"
    read: Callable[[], Iterable["Batch"]]
    cache: dict[str, Any] = field(default_factory=dict)


def _eval_config(family: type) -> type:
    """The family's `eval` block: `eval_base` plus one float field per post-hoc weight (its default from
    `weights`), each checked in [0, 1] like every other key (a ConfigError naming eval.<weight>)."""
    base, weights = family.eval_base, dict(family.weights)
    for name, default in weights.items():
        check(isinstance(default, (int, float)) and 0 <= default <= 1, f"eval.{name}", "a default in [0, 1]", default)

    def __post_init__(self: Any) -> None:
        base.__post_init__(self)
        for name in weights:
            v = getattr(self, name)
            check(0 <= v <= 1, f"eval.{name}", "in [0, 1]", v)

    cls = dataclasses.make_dataclass(
        "eval_config", [(n, float, dataclasses.field(default=float(v))) for n, v in weights.items()], bases=(base,),
        frozen=True, namespace={"__post_init__": __post_init__,
                                "__doc__": f"The eval block of {family.__name__}: {base.__name__} and the weights "
                                           f"{', '.join(weights) or '(none)'}, each in [0, 1]."})
    # Reachable by name as the family's attribute: pickle (Ray payloads, copies) finds the class again.
    cls.__module__, cls.__qualname__ = family.__module__, f"{family.__qualname__}.eval_config"
    return cls


class ModelFamily(ABC):
    """One model family, its required core (this module's docstring). Subclass, fill the class attributes,
    implement build, the training step (`loss`, or `train_step`), score_parts and coefficients, add the
    optional capabilities it needs (`dedn.families.capabilities`), and register an instance with
    `dedn.families.register_family`."""

    name: str = ""  # cfg.model.name; registered models are "<name>-<dataset>"
    title: str = ""  # how titles and captions name it ("DEDN")
    model_config: type = object
    loss_config: type = object
    # The post-hoc inference weights, {name: default in [0, 1]}: eval.<name> keys, fitted on validation
    # (eval.fit_weights) on `weight_grid`, and the `weights` that `coefficients` receives.
    weights: Mapping[str, float] = {}
    eval_base: type = EvalConfig  # the eval block besides the weights (D3GZSL: its final classifier's settings)
    loss_parts: tuple[str, ...] = ("loss",)  # every part the training step may return, "loss" (the total) first
    package: str = ""  # import path of the package holding presets/ and search_space.yaml ("" = none)

    # Derived from `weights` and `eval_base` when a family class is defined (never set by hand).
    eval_config: type = EvalConfig
    weight_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "weights" in vars(cls) or "eval_base" in vars(cls):
            cls.weight_names = tuple(cls.weights)
            cls.eval_config = _eval_config(cls)

    # ---- presets and search space ------------------------------------------------------
    def _folder(self) -> Traversable | None:
        return resources.files(self.package) if self.package else None

    def presets(self) -> tuple[str, ...]:
        """Dataset names this family has presets for ("awa2", "cub", "sun")."""
        folder = self._folder()
        if folder is None or not (folder / "presets").is_dir():
            return ()
        return tuple(sorted(p.name[:-5] for p in (folder / "presets").iterdir() if p.name.endswith(".yaml")))

    def preset_file(self, dataset: str) -> Traversable | None:
        folder = self._folder()
        return None if folder is None or dataset.lower() not in self.presets() else folder / "presets" / f"{dataset.lower()}.yaml"

    def search_space_file(self) -> Traversable | None:
        """The family's default search space (a family outside a package overrides this to name its own file)."""
        folder = self._folder()
        return folder / "search_space.yaml" if folder is not None and (folder / "search_space.yaml").is_file() else None

    # ---- before a run ---------------------------------------------------------------------
    def resolve(self, cfg: "RunConfig", class_side: "ClassSide") -> "RunConfig":
        """The run config with this family's dataset-dependent defaults filled in (the driver calls it
        before any worker starts); raise ConfigError for what cannot work on this dataset."""
        return cfg

    # ---- the network ---------------------------------------------------------------------
    @abstractmethod
    def build(self, cfg: "RunConfig", class_side: "ClassSide", feature_shape: tuple[int, int, int],
              meta: Mapping[str, Any] | None = None) -> nn.Module:
        """The network for a dataset; `meta` is a saved model's `model_meta` when it is rebuilt."""

    def model_meta(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able facts a saved model needs besides weights and config to be rebuilt (DEDN: its clusters)."""
        return {}

    # ---- training ------------------------------------------------------------------------
    def optimizers(self, cfg: "RunConfig", model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """RMSprop on every parameter (the paper's optimiser)."""
        o = cfg.optim
        return {"model": torch.optim.RMSprop(model.parameters(), lr=o.lr, alpha=o.alpha, momentum=o.momentum,
                                             weight_decay=o.weight_decay)}

    def loss(self, out: Any, labels: Tensor, protocol: "ClassProtocol", cfg: "RunConfig") -> dict[str, Tensor]:
        """{"loss": the total, part: value, ...} of a forward output: what the default `train_step` minimises."""
        raise NotImplementedError(f"{type(self).__name__} implements neither loss nor its own train_step")

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> dict[str, float]:
        """Forward, `loss`, a finiteness check before any update, backward, clip, then every optimiser steps
        (each on the parameters it was given: one per network, or one over the whole model)."""
        with ctx.autocast():
            out = model(x)
        parts = self.loss(out, y, ctx.protocol, ctx.cfg)
        values = ctx.check_finite(parts)
        for opt in ctx.optimizers.values():
            opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if ctx.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.cfg.optim.grad_clip)
        for opt in ctx.optimizers.values():
            opt.step()
        return values

    # ---- scoring -------------------------------------------------------------------------
    @abstractmethod
    def score_parts(self, out: Any, class_attributes: Tensor | None = None) -> dict[str, Tensor]:
        """{part: (B, K)} float32 scores of a forward output; class_attributes (K', D) replaces A (new classes)."""

    @abstractmethod
    def coefficients(self, cfg: "RunConfig", weights: Mapping[str, float], names: Sequence[str]) -> list[float]:
        """The factor of each named part in the inference score at `weights` ({weight name: value})."""

    def weight_grid(self, cfg: "RunConfig") -> PostHocWeights:
        """Every weight on the eval.weight_grid_step grid; families fix the ones a config makes moot."""
        grid = weight_grid_values(cfg.eval.weight_grid_step)
        return PostHocWeights(self.weight_names, tuple(grid for _ in self.weight_names))

    def configured_weights(self, cfg: "RunConfig") -> dict[str, float]:
        return {n: float(getattr(cfg.eval, n)) for n in self.weight_names}

    def combine(self, cfg: "RunConfig", parts: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> Tensor:
        """The inference score sum_p c_p part_p (B, K) at `weights` (default: the configured ones)."""
        names = list(parts)
        coef = self.coefficients(cfg, weights if weights is not None else self.configured_weights(cfg), names)
        total = None
        for c, n in zip(coef, names):
            if c == 0.0:
                continue
            total = c * parts[n] if total is None else total + c * parts[n]
        return total if total is not None else torch.zeros_like(parts[names[0]])

    # ---- naming --------------------------------------------------------------------------
    def describe(self, cfg: "RunConfig") -> str:
        """A caption: "DEDN CUB (paper)"."""
        return f"{self.title} {cfg.dataset} ({cfg.variant})"
