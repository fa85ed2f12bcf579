"""A third model family defined inside the test suite: the proof that the family interface is real.

Linear maps from pooled features to attributes: a mean-pooled head and a max-pooled head, each
giving class scores (attributes) A^T; the post-hoc weight `alpha` mixes them (alpha S_mean +
(1 - alpha) S_max). Only the required core (`dedn.families.base`): its own config blocks and
weight, loss part names (ce_mean, ce_max, ridge), two optimisers (one per head, both stepped by the
default training step), a search space of its own, no preset and no optional capability. Importing this module registers it; Ray workers and job subprocesses import it through
DEDN_FAMILY_MODULES=toy_family with this folder on PYTHONPATH. Nothing outside tests/ knows it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config_sections import check
from dedn.families import ModelFamily, register_family

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ToyModelConfig:
    name: str = "toy"
    normalize: bool = True  # L2-normalise the pooled features


@dataclass(frozen=True)
class ToyLossConfig:
    ridge: float = 1e-3  # weight of the squared-weight penalty

    def __post_init__(self) -> None:
        check(self.ridge >= 0, "loss.ridge", ">= 0", self.ridge)


@dataclass
class ToyOutput:
    attr_mean: Tensor  # (B, D)
    attr_max: Tensor  # (B, D)
    class_attributes: Tensor  # (K, D)


class ToyNet(nn.Module):
    def __init__(self, cfg: ToyModelConfig, class_attributes: Tensor, feature_shape: tuple[int, int, int]):
        super().__init__()
        c = feature_shape[0]
        d = class_attributes.shape[1]
        self.cfg, self.feature_shape = cfg, tuple(feature_shape)
        self.head_mean = nn.Linear(c, d)
        self.head_max = nn.Linear(c, d)
        self.register_buffer("class_attributes", class_attributes.float())

    def forward(self, x: Tensor) -> ToyOutput:
        f = x.flatten(2)  # (B, C, R)
        mean, mx = f.mean(-1), f.amax(-1)  # (B, C) each
        if self.cfg.normalize:
            mean, mx = F.normalize(mean, dim=1), F.normalize(mx, dim=1)
        return ToyOutput(self.head_mean(mean), self.head_max(mx), self.class_attributes)


class ToyFamily(ModelFamily):
    name = "toy"
    title = "Toy linear"
    model_config = ToyModelConfig
    loss_config = ToyLossConfig
    weights = {"alpha": 0.5}  # eval.alpha: weight of the mean-pooled head's scores
    loss_parts = ("loss", "ce_mean", "ce_max", "ridge")

    def search_space_file(self) -> Path:  # next to this file: a family outside the package ships its own
        return HERE / "toy_space.yaml"

    def build(self, cfg, class_side, feature_shape, meta=None) -> nn.Module:
        return ToyNet(cfg.model, torch.from_numpy(np.asarray(class_side.attributes, dtype=np.float32)), feature_shape)

    def optimizers(self, cfg, model) -> dict[str, torch.optim.Optimizer]:
        net = getattr(model, "module", model)
        return {"mean": torch.optim.SGD(net.head_mean.parameters(), lr=cfg.optim.lr, momentum=0.9),
                "max": torch.optim.Adam(net.head_max.parameters(), lr=cfg.optim.lr)}

    def loss(self, out, labels, protocol, cfg) -> dict[str, Tensor]:
        active = protocol.active_mask(labels.device)
        parts = self.score_parts(out)
        ce = {k: F.cross_entropy(v.masked_fill(~active, float("-inf")), labels) for k, v in parts.items()}
        ridge = out.attr_mean.pow(2).mean() + out.attr_max.pow(2).mean()
        total = ce["S_mean"] + ce["S_max"] + cfg.loss.ridge * ridge
        return {"loss": total, "ce_mean": ce["S_mean"], "ce_max": ce["S_max"], "ridge": ridge}

    def score_parts(self, out, class_attributes=None) -> dict[str, Tensor]:
        a = out.class_attributes if class_attributes is None else class_attributes
        return {"S_mean": out.attr_mean.float() @ a.float().t(), "S_max": out.attr_max.float() @ a.float().t()}

    def coefficients(self, cfg, weights: Mapping[str, float], names: Sequence[str]) -> list[float]:
        alpha = float(weights["alpha"])
        return [{"S_mean": alpha, "S_max": 1.0 - alpha}[n] for n in names]


FAMILY = register_family(ToyFamily())
