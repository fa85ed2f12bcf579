"""The model-family interface (`ModelFamily`) and the per-step context the training loop hands it.

Contract, in the order the training loop uses it (docs/design.md#model-families):

* config: `model_config`, `loss_config`, `eval_config` are the dataclasses of the run config's
  `model`, `loss` and `eval` blocks for this family (`eval_config` extends `dedn.config.EvalConfig`
  with the family's post-hoc weights as float fields in [0, 1]); presets live in the family's
  package folder `presets/<dataset>.yaml`, its default search space in `search_space.yaml`.
* `build(cfg, class_side, feature_shape, meta)` -> nn.Module; `model_meta(model)` is what a
  saved model needs besides its weights to be rebuilt (DEDN: its clusters), passed back as meta.
* `optimizers(cfg, model)` -> {name: optimizer}; `train_step(model, x, y, ctx)` runs one batch:
  any number of forward/backward/step calls on those optimisers; returns the named loss parts
  as floats (`ctx.check_finite` turns tensors into floats and stops on NaN/inf). The default
  step is forward -> `loss` -> backward -> clip -> step on one optimiser.
* `score_parts(out, class_attributes=None)` -> {part: (B, K)} float32 class scores, linear
  pieces of the inference score; `coefficients(cfg, weights, names)` the weight of each part at
  one setting of the post-hoc weights; `weight_grid(cfg)` the values each weight is searched on.
  Inference scores = sum_p coefficient_p * part_p (`combine`).
* Optional hooks, no-ops by default: `wrap(model, ddp)` the training-time module (DDP around the
  whole network by default; a family with several separately stepped networks wraps each);
  `prepare(model, data, ctx)` once at the start of a phase that is not resumed (pretraining,
  fitting statistics on the training split); `before_eval(model, data, ctx)` before every
  evaluation (fitting an inference-time classifier); `for_classes(model, cfg, A)` the network that
  scores the classes of A (K + E rows) when new classes arrive at prediction; `section_aliases`
  extra names of config sections (D3GZSL: `d3.` for its `loss.` block).
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dedn.accel import autocast
from dedn.config_sections import check_weight_grid_step
from dedn.errors import NonFiniteLossError

if TYPE_CHECKING:
    from dedn.data.class_side import ClassSide
    from dedn.config import RunConfig
    from dedn.data.reader import Batch
    from dedn.protocol import ClassProtocol

__all__ = ["ModelFamily", "PhaseData", "PostHocWeights", "Setting", "StepContext", "unwrap_model",
           "weight_grid_values"]


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
    """The network inside a DDP (or similar) wrapper (`ModelFamily.wrap`); the model itself otherwise."""
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


@dataclass(frozen=True)
class Setting:
    """One ablation setting a family declares (`ModelFamily.ablations`; DEDN's: a row of Table 3 or a bar of
    Figure 5): a key, the paper's label, the values of the switches it turns (`dedn.analysis.ablation` runs them)."""

    key: str  # identifier used on the command line, in run names and in the CSV
    label: str  # the row label as the paper prints it
    study: str  # "table3" or "figure5"
    changes: tuple[tuple[str, Any], ...] = ()  # departures from FULL, as (dotted key, value)
    description: str = ""

    full: tuple[tuple[str, Any], ...] = ()  # every switch of the family's studies at its full-model value

    @property
    def overrides(self) -> dict[str, Any]:
        """Values of every switch for this setting (`full` with `changes` applied)."""
        return {**dict(self.full), **dict(self.changes)}


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
    """A phase's training split for a family's own passes over it (`prepare`, `before_eval`).

    `read()` yields every row of the split once, in file order, the same rows on every rank (not
    the rank's share), so anything fitted on it is identical across ranks without communication.
    `cache` is the family's to keep what it derived (pooled features) for the rest of the phase.
    """

    phase: str
    split: str
    protocol: "ClassProtocol"
    read: Callable[[], Iterable["Batch"]]
    cache: dict[str, Any] = field(default_factory=dict)


class ModelFamily:
    """One model family. Subclass, fill the class attributes, implement build / loss / score_parts /
    coefficients, and register an instance with `dedn.families.register_family`."""

    name: str = ""  # cfg.model.name; registered models are "<name>-<dataset>"
    title: str = ""  # how titles and captions name it ("DEDN")
    model_config: type = object
    loss_config: type = object
    eval_config: type = object
    loss_parts: tuple[str, ...] = ("loss",)  # every part train_step may return, "loss" (the total) first
    score_part_names: tuple[str, ...] = ()
    weight_names: tuple[str, ...] = ()  # eval.<name> keys, each a float in [0, 1]
    package: str = ""  # import path of the package holding presets/ and search_space.yaml ("" = none)
    ablations: tuple[Setting, ...] = ()  # the ablation settings this family defines (Table 3 for DEDN)
    section_aliases: Mapping[str, str] = {}  # {alias: section}: `d3.enabled` means `loss.enabled` for D3GZSL

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
        folder = self._folder()
        return folder / "search_space.yaml" if folder is not None and (folder / "search_space.yaml").is_file() else None

    # ---- before a run ---------------------------------------------------------------------
    def resolve(self, cfg: "RunConfig", class_side: "ClassSide") -> "RunConfig":
        """The run config with this family's dataset-dependent defaults filled in (the driver calls it
        before any worker starts); raise ConfigError for what cannot work on this dataset."""
        return cfg

    # ---- the network ---------------------------------------------------------------------
    def build(self, cfg: "RunConfig", class_side: "ClassSide", feature_shape: tuple[int, int, int],
              meta: Mapping[str, Any] | None = None) -> nn.Module:
        raise NotImplementedError

    def model_meta(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able facts a saved model needs besides weights and config to be rebuilt."""
        return {}

    # ---- training ------------------------------------------------------------------------
    def optimizers(self, cfg: "RunConfig", model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """RMSprop on every parameter (the paper's optimiser)."""
        o = cfg.optim
        return {"model": torch.optim.RMSprop(model.parameters(), lr=o.lr, alpha=o.alpha, momentum=o.momentum,
                                             weight_decay=o.weight_decay)}

    def loss(self, out: Any, labels: Tensor, protocol: "ClassProtocol", cfg: "RunConfig") -> dict[str, Tensor]:
        raise NotImplementedError

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> dict[str, float]:
        """Forward, `loss`, a finiteness check before any update, backward, clip, step."""
        with ctx.autocast():
            out = model(x)
        parts = self.loss(out, y, ctx.protocol, ctx.cfg)
        values = ctx.check_finite(parts)
        (opt,) = ctx.optimizers.values()
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if ctx.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.cfg.optim.grad_clip)
        opt.step()
        return values

    def wrap(self, model: nn.Module, ddp: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """The module train_step receives: `ddp` (DistributedDataParallel, or identity on one
        process) around the whole network. `.module` must lead to the network (`unwrap_model`), and
        `train_step` calls it once per step on the batch's features: the training callbacks'
        `wrap_model` (`dedn.training.callbacks`) may hook that call."""
        return ddp(model)

    def prepare(self, model: nn.Module, data: PhaseData, ctx: StepContext) -> None:
        """Once before the first epoch of a phase that is not resumed (the checkpoint holds its result)."""

    def before_eval(self, model: nn.Module, data: PhaseData, ctx: StepContext) -> None:
        """Before every evaluation of the phase (validation each epoch, the test once)."""

    # ---- scoring -------------------------------------------------------------------------
    def for_classes(self, model: nn.Module, cfg: "RunConfig", class_attributes: Tensor, *, seen: Sequence[int],
                    unseen: Sequence[int]) -> nn.Module:
        """The network that scores the K + E classes of class_attributes (E new ones after the K known).

        Families that score by class attributes (score_parts(out, class_attributes)) need none:
        the same network. A family whose classifier is fitted per class set returns a refitted copy.
        """
        return model

    def score_parts(self, out: Any, class_attributes: Tensor | None = None) -> dict[str, Tensor]:
        """{part: (B, K)} float32 scores of a forward output; class_attributes (K', D) replaces A (new classes)."""
        raise NotImplementedError

    def coefficients(self, cfg: "RunConfig", weights: Mapping[str, float], names: Sequence[str]) -> list[float]:
        """The factor of each named part in the inference score at `weights`."""
        raise NotImplementedError

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

    def attention_maps(self, out: Any) -> dict[str, Tensor]:
        """{name: (B, D, R)} attention of a forward(return_attention=True) output, for heat maps; none by default."""
        return {}
