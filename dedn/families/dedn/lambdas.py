"""DEDN's (lambda_rc, lambda_e) search: the family's weight grid over `dedn.metrics.WeightSearch`, with DEDN's axes by name.

experts: "both" | "coarse" | "fine"; with one expert lambda_e is fixed (1 for coarse, 0 for
fine); without channel attention lambda_rc is fixed at 1. `prefer` = the configured pair:
among grid points with equal H, the closest one wins (docs/method.md#post-hoc-lambda-fit).
"""
from __future__ import annotations

from dedn.errors import ConfigError
from dedn.families.base import PostHocWeights, weight_grid_values
from dedn.families.dedn import FAMILY
from dedn.metrics import GZSLCounts, WeightSearch
from dedn.protocol import ClassProtocol

__all__ = ["LambdaSearch"]


class LambdaSearch(WeightSearch):
    def __init__(self, num_classes: int, step: float = 0.05, experts: str = "both", *, channel_attention: bool = True,
                 calibration: float = 0.0, prefer: tuple[float, float] = (0.8, 0.9), max_elements: int = 1 << 24):
        if experts not in ("both", "coarse", "fine"):
            raise ConfigError("model.experts", "one of both|coarse|fine", experts, "LambdaSearch")
        grid = weight_grid_values(step)
        rc = grid if channel_attention else (1.0,)
        e = grid if experts == "both" else ((1.0,) if experts == "coarse" else (0.0,))
        super().__init__(num_classes, PostHocWeights(("lambda_rc", "lambda_e"), (rc, e)),
                         lambda w, names: FAMILY.coefficients(None, w, names),  # type: ignore[arg-type]
                         calibration=calibration, prefer={"lambda_rc": prefer[0], "lambda_e": prefer[1]},
                         max_elements=max_elements)

    @property
    def rc_values(self) -> list[float]:
        return list(self.values[0])

    @property
    def e_values(self) -> list[float]:
        return list(self.values[1])

    @property
    def grid(self) -> list[tuple[float, float]]:
        return [(p["lambda_rc"], p["lambda_e"]) for p in self.points]

    def counts_at(self, i_rc: int, i_e: int | None = None) -> GZSLCounts:  # type: ignore[override]
        """The counts of grid point (rc_values[i_rc], e_values[i_e]) (or of flat index i_rc alone)."""
        return super().counts_at(i_rc if i_e is None else i_rc * len(self.values[1]) + i_e)

    def best(self, protocol: ClassProtocol) -> tuple[float, float, dict[str, float]]:  # type: ignore[override]
        w, m = super().best(protocol)
        return w["lambda_rc"], w["lambda_e"], m
