"""DEDN (Rao et al., IJCAI 2024) as a model family: the coarse and fine experts, their losses and eqs. 8 / 19.

Score parts P_rc, P_cc (coarse expert: region, channel) and P_rf, P_cf (fine expert), each
O A^T (B, K). Post-hoc weights lambda_rc (eq. 8, region vs channel within an expert) and
lambda_e (eq. 19, coarse vs fine). docs/method.md#inference states the equations.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dedn.data.clusters import MANUAL_CLUSTERS, cluster_summary, resolve_clusters, resolve_named_clusters
from dedn.families import register_family
from dedn.families.base import ModelFamily, PostHocWeights, weight_grid_values
from dedn.families.capabilities import HasAttentionMaps
from dedn.families.dedn.config import DEDNLossConfig, DEDNModelConfig
from dedn.families.dedn.losses import dedn_loss
from dedn.families.dedn.model import DEDN

if TYPE_CHECKING:
    from dedn.data.class_side import ClassSide
    from dedn.config import RunConfig
    from dedn.protocol import ClassProtocol

__all__ = ["DEDNFamily", "FAMILY", "PART_NAMES"]

PART_NAMES = ("P_rc", "P_cc", "P_rf", "P_cf")


class DEDNFamily(ModelFamily, HasAttentionMaps):
    name = "dedn"
    title = "DEDN"
    model_config = DEDNModelConfig
    loss_config = DEDNLossConfig
    # eq. 8: region vs channel output within an expert; eq. 19: cExp vs fExp scores (refitted on validation)
    weights = {"lambda_rc": 0.8, "lambda_e": 0.9}
    loss_parts = ("loss", "mal_c", "mal_f", "align_c", "align_f", "distill", "cal_c", "cal_f")
    package = "dedn.families.dedn"

    def resolve(self, cfg: "RunConfig", class_side: "ClassSide") -> "RunConfig":
        """model.clusters=manual on a dataset without manual clusters (APY, your own) becomes k-means,
        with a warning that says so: the default config then runs on any dataset. k-means clusters
        are made here once: model.num_clusters becomes their number (what the run logs), and one
        line prints which attributes each holds."""
        m = cfg.model
        has_manual = "manual" in (class_side.clusters or {}) or class_side.name in MANUAL_CLUSTERS
        fallback = m.clusters == "manual" and not has_manual
        if fallback:
            cfg = cfg.replace(**{"model.clusters": "kmeans", "model.cluster_layout": "paper"})
        if cfg.model.clusters != "kmeans":
            return cfg
        named = resolve_named_clusters(class_side, "kmeans", cfg.model.num_clusters, cfg.optim.seed)
        if fallback:
            warnings.warn(f"model.clusters: {class_side.name} has no manual attribute clusters; using k-means on the "
                          f"attribute word vectors instead (model.clusters=kmeans, model.num_clusters={len(named)})",
                          UserWarning, stacklevel=2)
        print(f"DEDN fine-expert clusters on {class_side.name}: k-means, model.num_clusters={len(named)}: "
              f"{cluster_summary(named, class_side.attribute_names)}", flush=True)
        return cfg.replace(**{"model.num_clusters": len(named)})

    def build(self, cfg: "RunConfig", class_side: "ClassSide", feature_shape: tuple[int, int, int],
              meta: Mapping[str, Any] | None = None) -> nn.Module:
        if meta and meta.get("clusters"):
            clusters = [list(map(int, q)) for q in meta["clusters"]]
        else:  # only DEDN's fine expert has clusters: resolved (k-means, ...) here
            m = cfg.model
            clusters = resolve_clusters(class_side, m.clusters, m.num_clusters, cfg.optim.seed, layout=m.cluster_layout)
        return DEDN(cfg.model, word_vectors=torch.from_numpy(np.asarray(class_side.word_vectors, dtype=np.float32)),
                    class_attributes=torch.from_numpy(np.asarray(class_side.attributes, dtype=np.float32)),
                    clusters=clusters, feature_shape=feature_shape)

    def model_meta(self, model: nn.Module) -> dict[str, Any]:
        return {"clusters": [list(map(int, q)) for q in getattr(model, "clusters", [])]}

    def loss(self, out: Any, labels: Tensor, protocol: "ClassProtocol", cfg: "RunConfig") -> dict[str, Tensor]:
        return dedn_loss(out, labels, protocol, cfg.loss, cfg.variant)

    def score_parts(self, out: Any, class_attributes: Tensor | None = None) -> dict[str, Tensor]:
        if class_attributes is not None:
            out = dataclasses.replace(out, class_attributes=class_attributes)
        return out.score_parts()

    def weight_grid(self, cfg: "RunConfig") -> PostHocWeights:
        """lambda_rc is moot without channel attention (fixed 1), lambda_e with one expert (1 coarse, 0 fine)."""
        grid = weight_grid_values(cfg.eval.weight_grid_step)
        m = cfg.model
        rc = grid if m.channel_attention else (1.0,)
        e = grid if m.experts == "both" else ((1.0,) if m.experts == "coarse" else (0.0,))
        return PostHocWeights(self.weight_names, (rc, e))

    def coefficients(self, cfg: "RunConfig", weights: Mapping[str, float], names: Sequence[str]) -> list[float]:
        """Eq. 8 within each expert (P_r* lambda_rc, P_c* 1 - lambda_rc), eq. 19 across (coarse lambda_e,
        fine 1 - lambda_e). A lone region part has weight 1 in its expert; a lone expert weight 1."""
        rc, e = float(weights["lambda_rc"]), float(weights["lambda_e"])
        both = any(n.endswith("c") for n in names) and any(n.endswith("f") for n in names)
        out = []
        for n in names:
            if n not in PART_NAMES:
                raise KeyError(f"DEDN has no score part {n!r} (parts: {PART_NAMES})")
            has_channel = f"P_c{n[-1]}" in names
            w_rc = (rc if n.startswith("P_r") else 1.0 - rc) if has_channel else 1.0
            w_e = (e if n.endswith("c") else 1.0 - e) if both else 1.0
            out.append(w_rc * w_e)
        return out

    def attention_maps(self, out: Any) -> dict[str, Tensor]:
        maps = {}
        for label, ex in (("cExp", out.coarse), ("fExp", out.fine)):
            if ex is not None and ex.region_attention is not None:
                maps[label] = ex.region_attention
        return maps


FAMILY = register_family(DEDNFamily())
