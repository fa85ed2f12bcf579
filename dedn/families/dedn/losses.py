"""DEDN's objective, eq. 18: each expert's MAL (eq. 15) and alignment (eqs. 16, 17), and their distillation (eq. 12).

The building blocks (MAL, JSD, the distances, calibration) are shared in `dedn.nn.losses`;
docs/method.md#the-objective states the equations, docs/reference-variant.md#the-differences
the coded form.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dedn.families.dedn.config import DEDNLossConfig as LossConfig
from dedn.families.dedn.model import DEDNOutput, ExpertOutput
from dedn.nn.losses import biased_scores, calibration_loss, cross_entropy_loss, distance, mal_loss, reference_mal_loss
from dedn.protocol import ClassProtocol

__all__ = ["dedn_loss"]


def _classification(ex: ExpertOutput, labels: Tensor, seen: Tensor, active: Tensor, cfg: LossConfig, variant: str) -> Tensor:
    if not cfg.mal:
        return cross_entropy_loss(ex.scores, labels, active)
    if variant == "reference":
        return reference_mal_loss(ex.scores, labels, seen, active, cfg.reference_margin)
    return mal_loss(ex.scores, labels, seen, active, cfg.epsilon)


def dedn_loss(out: DEDNOutput, labels: Tensor, protocol: ClassProtocol, cfg: LossConfig, variant: str) -> dict[str, Tensor]:
    """Eq. 18: [MAL_c + beta align_c] + [MAL_f + beta align_f] + gamma distill (+ l_cal Cal).

    labels (B,) int64 class ids. Returns {'loss': total, and the unweighted parts that are on:
    'mal_c', 'mal_f', 'align_c', 'align_f', 'distill', 'cal_c', 'cal_f'}. Parts with zero
    weight or switched off are not computed; one expert -> no distillation.
    """
    if variant not in ("paper", "reference"):
        raise ValueError(f"variant: expected one of paper|reference, found {variant!r}")
    dev = out.class_attributes.device
    seen, unseen, active = protocol.seen_mask(dev), protocol.unseen_mask(dev), protocol.active_mask(dev)
    labels = labels.to(dev).long()
    parts: dict[str, Tensor] = {}
    total: Tensor | None = None

    def add(name: str, value: Tensor, weight: float) -> None:
        nonlocal total
        parts[name] = value
        total = weight * value if total is None else total + weight * value

    with torch.autocast(device_type=dev.type, enabled=False):
        for tag, ex in (("c", out.coarse), ("f", out.fine)):
            if ex is None:
                continue
            add(f"mal_{tag}", _classification(ex, labels, seen, active, cfg, variant), 1.0)
            if cfg.align and cfg.beta > 0 and ex.o_channel is not None:
                # eq. 7: softmax over attributes
                add(f"align_{tag}", distance(ex.o_region, ex.o_channel, cfg.distance), cfg.beta)
            if cfg.calibration_weight > 0:
                add(f"cal_{tag}", calibration_loss(ex.scores, seen, unseen, active, protocol.unseen_index(dev)), cfg.calibration_weight)
        if cfg.distill and cfg.gamma > 0 and out.coarse is not None and out.fine is not None:
            pc, pf = out.coarse.scores, out.fine.scores
            if variant == "reference":
                pc, pf = biased_scores(pc, seen, unseen), biased_scores(pf, seen, unseen)
            add("distill", distance(pc, pf, cfg.distance, mask=protocol.active_index(dev)), cfg.gamma)  # eq. 12
    if total is None:
        raise ValueError("dedn_loss: the model has no expert")
    return {"loss": total, **parts}
