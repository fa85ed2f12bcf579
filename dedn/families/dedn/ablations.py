"""DEDN's ablation studies: the paper's Table 3 and Figure 5 (Rao et al., IJCAI 2024) as `Setting` rows.

| key | paper's row | what changes |
|---|---|---|
| cexp_no_distill | cExp w/o L_distill | model.experts=coarse, loss.distill=false |
| fexp_no_distill | fExp w/o L_distill | model.experts=fine, loss.distill=false |
| no_distill | DEDN w/o L_distill | loss.distill=false |
| no_ca | DAN w/o CA | model.channel_attention=false (both experts) |
| no_mal | DEDN w/o L_mal | loss.mal=false (plain cross-entropy) |
| no_align | DAN w/o L_align | loss.align=false |
| full | DEDN (full) | nothing: manual clusters, every module on |

Figure 5: (a) manual clusters (= `full`) against K-Means clusters of the attribute word vectors
(`kmeans`, as many clusters as the manual division unless model.num_clusters says otherwise);
(b) the manual clusters halved (`halved`: consecutive pairs merged, CUB 6 -> 3, SUN/AWA2 4 -> 2).
"""
from __future__ import annotations

from typing import Any

from dedn.families.base import Setting

__all__ = ["FULL", "TABLE3", "FIGURE5", "SETTINGS"]

# The switches the ablations turn, at their DEDN (full) values.
FULL: dict[str, Any] = {
    "model.experts": "both",
    "model.channel_attention": True,
    "model.clusters": "manual",
    "loss.mal": True,
    "loss.align": True,
    "loss.distill": True,
}


_F = tuple(FULL.items())


def _s(key: str, label: str, study: str, changes: tuple[tuple[str, Any], ...], description: str) -> Setting:
    return Setting(key, label, study, changes, description, full=_F)


TABLE3: tuple[Setting, ...] = (
    _s("cexp_no_distill", "cExp w/o L_distill", "table3",
            (("model.experts", "coarse"), ("loss.distill", False)), "coarse expert alone, no distillation"),
    _s("fexp_no_distill", "fExp w/o L_distill", "table3",
            (("model.experts", "fine"), ("loss.distill", False)), "fine expert alone, no distillation"),
    _s("no_distill", "DEDN w/o L_distill", "table3", (("loss.distill", False),), "both experts, no distillation"),
    _s("no_ca", "DAN w/o CA", "table3", (("model.channel_attention", False),),
            "no channel attention in any DAN sub-network"),
    _s("no_mal", "DEDN w/o L_mal", "table3", (("loss.mal", False),), "cross-entropy instead of the margin-aware loss"),
    _s("no_align", "DAN w/o L_align", "table3", (("loss.align", False),), "no region/channel alignment loss"),
    _s("full", "DEDN (full)", "table3", (), "every module on, manual attribute clusters"),
)
FIGURE5: tuple[Setting, ...] = (
    # model.cluster_layout=paper: the reference variant's SUN cluster slip exists for the manual clusters only
    _s("kmeans", "DEDN, K-Means clusters", "figure5", (("model.clusters", "kmeans"), ("model.cluster_layout", "paper")),
            "Figure 5 (a): attribute clusters by K-Means on the word vectors"),
    _s("halved", "DEDN, half clusters", "figure5", (("model.clusters", "halved"), ("model.cluster_layout", "paper")),
            "Figure 5 (b): the manual clusters merged in pairs"),
)
SETTINGS: tuple[Setting, ...] = TABLE3 + FIGURE5
