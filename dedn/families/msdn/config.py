"""MSDN's config blocks (docs/msdn.md §5-§7: #5-training-and-parameters to
#7-per-dataset-settings-and-reported-results): `model` and `loss`; its `eval` block is the common one plus
its weight w1 (`MSDNFamily.weights`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dedn.config_sections import check

__all__ = ["MSDNModelConfig", "MSDNLossConfig"]


@dataclass(frozen=True)
class MSDNModelConfig:
    name: str = "msdn"
    normalize_features: bool = True  # each region's C-vector L2-normalised
    normalize_word_vectors: bool = False  # AWA2: re-normalise V's rows at every forward


@dataclass(frozen=True)
class MSDNLossConfig:
    """docs/msdn.md#4-losses: (CE_1 + lam Cal_1) + (CE_2 + lam Cal_2) + gamma (distance + JSD)(S1, S2)."""

    gamma: float = 1e-3  # mutual distillation weight
    calibration_weight: float = 0.1  # lam of the self-calibration terms
    distill: bool = True
    distance: Literal["mse", "sse", "cubic"] = "cubic"

    def __post_init__(self) -> None:
        for key in ("gamma", "calibration_weight"):
            v = getattr(self, key)
            check(isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf"), f"loss.{key}", "a finite number >= 0", v)
        check(self.distance in ("mse", "sse", "cubic"), "loss.distance", "one of mse|sse|cubic", self.distance)
