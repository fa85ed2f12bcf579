"""MSDN (Chen et al., CVPR 2022) as a model family: two sub-nets, mutual distillation, w1 S1 + w2 S2.

Score parts S_av (attribute->visual, S1) and S_va (visual->attribute, S2), each psi A^T (B, K)
without the +-1 margin (calibrated stacking applies it at evaluation). One post-hoc weight,
`eval.w1` (w2 = 1 - w1; docs/msdn.md#6-inference). The network and its loss:
`dedn.families.msdn.model`; the spec: docs/msdn.md.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dedn.families import register_family
from dedn.families.base import ModelFamily
from dedn.families.capabilities import HasAttentionMaps
from dedn.families.msdn.config import MSDNLossConfig, MSDNModelConfig
from dedn.families.msdn.model import MSDN, msdn_loss

if TYPE_CHECKING:
    from dedn.data.class_side import ClassSide
    from dedn.config import RunConfig
    from dedn.protocol import ClassProtocol

__all__ = ["MSDNFamily", "FAMILY"]


class MSDNFamily(ModelFamily, HasAttentionMaps):
    name = "msdn"
    title = "MSDN"
    model_config = MSDNModelConfig
    loss_config = MSDNLossConfig
    # w1 S1 + (1 - w1) S2 (docs/msdn.md#6-inference): the weight of the attribute->visual sub-net's scores;
    # the authors fix it per dataset (the presets: eval.fit_weights false)
    weights = {"w1": 0.9}
    loss_parts = ("loss", "ce_av", "ce_va", "cal_av", "cal_va", "distill")
    package = "dedn.families.msdn"

    def build(self, cfg: "RunConfig", class_side: "ClassSide", feature_shape: tuple[int, int, int],
              meta: Mapping[str, Any] | None = None) -> nn.Module:
        return MSDN(cfg.model, word_vectors=torch.from_numpy(np.asarray(class_side.word_vectors, dtype=np.float32)),
                    class_attributes=torch.from_numpy(np.asarray(class_side.attributes, dtype=np.float32)),
                    feature_shape=tuple(int(x) for x in feature_shape))

    def loss(self, out: Any, labels: Tensor, protocol: "ClassProtocol", cfg: "RunConfig") -> dict[str, Tensor]:
        return msdn_loss(out, labels, protocol, cfg.loss)

    def score_parts(self, out: Any, class_attributes: Tensor | None = None) -> dict[str, Tensor]:
        if class_attributes is not None:
            out = dataclasses.replace(out, class_attributes=class_attributes)
        return {"S_av": out.scores_av, "S_va": out.scores_va}

    def coefficients(self, cfg: "RunConfig", weights: Mapping[str, float], names: Sequence[str]) -> list[float]:
        w1 = float(weights["w1"])
        table = {"S_av": w1, "S_va": 1.0 - w1}
        return [table[n] for n in names]

    def attention_maps(self, out: Any) -> dict[str, Tensor]:
        return {k: v for k, v in (("attribute->visual", out.attention_av), ("visual->attribute", out.attention_va))
                if v is not None}


FAMILY = register_family(MSDNFamily())
