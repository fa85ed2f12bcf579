"""DEDN's config blocks: `model` (architecture) and `loss` (eqs. 15-18); its `eval` block is the common one plus
its post-hoc weights lambda_rc (eq. 8) and lambda_e (eq. 19), `DEDNFamily.weights`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dedn.config_sections import check

__all__ = ["DEDNModelConfig", "DEDNLossConfig"]


@dataclass(frozen=True)
class DEDNModelConfig:
    """Architecture of DEDN."""

    name: str = "dedn"
    experts: Literal["both", "coarse", "fine"] = "both"  # Table 3: cExp only / fExp only
    channel_attention: bool = True  # Table 3: "DAN w/o CA"
    clusters: Literal["manual", "halved", "kmeans"] = "manual"  # Figure 5 studies
    num_clusters: int = 0  # kmeans only; 0 = as many clusters as the manual division
    region_rank: int = 0  # >0: low-rank region map V W1a W1b F (reference code, SUN: 256)
    # Low-rank W1 = W1a W1b only: "scaled" W1b ~ N(0, 1/rank), so W1 has unit-variance entries;
    # "unit" both factors ~ N(0, 1), W1 entries of variance rank (reference code, SUN)
    region_init: Literal["scaled", "unit"] = "scaled"
    # fExp clusters: "paper" as resolved; "reference_sun" the reference code's SUN indexing slip
    # (64/27/9/2) applied to SUN's manual 38/27/17/20 division (clusters.apply_cluster_layout)
    cluster_layout: Literal["paper", "reference_sun"] = "paper"
    normalize_features: bool = True  # L2 over channels per region, as the reference code does

    def __post_init__(self) -> None:
        check(self.experts in ("both", "coarse", "fine"), "model.experts", "one of both|coarse|fine", self.experts)
        check(self.clusters in ("manual", "halved", "kmeans"), "model.clusters", "one of manual|halved|kmeans", self.clusters)
        check(self.num_clusters >= 0, "model.num_clusters", ">= 0", self.num_clusters)
        check(self.region_rank >= 0, "model.region_rank", ">= 0", self.region_rank)
        check(self.region_init in ("scaled", "unit"), "model.region_init", "one of scaled|unit", self.region_init)
        check(self.cluster_layout in ("paper", "reference_sun"), "model.cluster_layout", "one of paper|reference_sun",
               self.cluster_layout)
        check(self.cluster_layout == "paper" or self.clusters == "manual", "model.cluster_layout",
               f"'paper' with model.clusters={self.clusters} ('reference_sun' rewrites the manual clusters only)",
               self.cluster_layout)


@dataclass(frozen=True)
class DEDNLossConfig:
    """Training objective, eqs. 15-18 (paper) or the reference code's form (docs/reference-variant.md#the-differences)."""

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
            check(isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf"), f"loss.{key}", "a finite number >= 0", v)
        check(self.distance in ("mse", "sse", "cubic"), "loss.distance", "one of mse|sse|cubic", self.distance)
