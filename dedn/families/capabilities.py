"""Optional capabilities of a model family, each declared by subclassing it next to `ModelFamily`.

The required core (`dedn.families.base.ModelFamily`) is what every family implements. What only
some families need is one of the classes below: a family declares a capability by listing it
among its bases (`class D3GZSLFamily(ModelFamily, PreparesPhases, ...)`) and implementing its one
member; the code that uses a capability asks `isinstance(family, Capability)` and otherwise does
the plain thing said in each docstring. Abstract members: a family that declares a capability and
leaves its method out fails when it is instantiated (at `register_family`), not mid-run.

No torch at import: `dedn.config` reads `AliasesSections` before any family's network is needed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

if TYPE_CHECKING:
    from torch import Tensor, nn

    from dedn.config import RunConfig
    from dedn.families.base import PhaseData, StepContext

__all__ = ["PreparesPhases", "RefitsBeforeEval", "RefitsForNewClasses", "WrapsForDDP", "HasAttentionMaps",
           "AliasesSections", "training_module", "section_aliases"]


class PreparesPhases(ABC):
    """The loop calls `prepare` once before the first epoch of a phase that is not resumed (the checkpoint holds its result)."""

    @abstractmethod
    def prepare(self, model: "nn.Module", data: "PhaseData", ctx: "StepContext") -> None:
        """Fit what the phase needs before training (D3GZSL: the feature scaler, the frozen teacher).

        `data.read()` yields the whole training split, the same rows on every rank, so what is fitted
        is identical across ranks; `data.cache` keeps what the family derives for the rest of the phase.
        Runs on the bare network, before DDP copies rank 0's weights."""


class RefitsBeforeEval(ABC):
    """The loop calls `before_eval` before every evaluation of a phase (each validation, the one test)."""

    @abstractmethod
    def before_eval(self, model: "nn.Module", data: "PhaseData", ctx: "StepContext") -> None:
        """Fit what inference needs on the training split (D3GZSL: its final classifier); `data` as for `prepare`."""


class RefitsForNewClasses(ABC):
    """The `Predictor` calls `for_classes` when new classes arrive at prediction; without it the same network
    scores them from their attribute rows (`score_parts(out, class_attributes)`)."""

    @abstractmethod
    def for_classes(self, model: "nn.Module", cfg: "RunConfig", class_attributes: "Tensor", *, seen: Sequence[int],
                    unseen: Sequence[int]) -> "nn.Module":
        """The network that scores the K + E classes of class_attributes (E new ones after the K known);
        D3GZSL: a copy with its final classifier refitted."""


class WrapsForDDP(ABC):
    """The driver calls `wrap` for the training-time module; without it DDP wraps the whole network (`ddp(model)`)."""

    @abstractmethod
    def wrap(self, model: "nn.Module", ddp: Callable[["nn.Module"], "nn.Module"]) -> "nn.Module":
        """The module `train_step` receives, with `ddp` (DistributedDataParallel, or identity on one process)
        around each separately stepped network (D3GZSL: G, D, student, sigmoid). `.module` must lead to the
        network (`unwrap_model`), and `train_step` calls the module once per step on the batch's features:
        the training callbacks' `wrap_model` (`dedn.training.callbacks`) may hook that call."""


class HasAttentionMaps(ABC):
    """The heat-map job (`dedn.analysis.heatmap`) calls `attention_maps`; a family without it has no heat maps."""

    @abstractmethod
    def attention_maps(self, out: Any) -> "dict[str, Tensor]":
        """{name: (B, D, R)} attention of a `forward(x, return_attention=True)` output (DEDN: "cExp", "fExp")."""


class AliasesSections:
    """`dedn.config` reads `section_aliases`: extra names of the run config's sections for this family's keys."""

    section_aliases: ClassVar[Mapping[str, str]]  # {alias: section}: D3GZSL's `d3.enabled` is `loss.enabled`


def training_module(family: object, model: "nn.Module", ddp: Callable[["nn.Module"], "nn.Module"]) -> "nn.Module":
    """The training-time module of `model`: the family's own wrapping (`WrapsForDDP`), else `ddp(model)`."""
    return family.wrap(model, ddp) if isinstance(family, WrapsForDDP) else ddp(model)


def section_aliases(family: object) -> Mapping[str, str]:
    """The family's section aliases (`AliasesSections`); none otherwise."""
    return family.section_aliases if isinstance(family, AliasesSections) else {}
