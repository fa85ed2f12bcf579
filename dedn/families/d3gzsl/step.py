"""One D3GZSL update in the order of the authors' `gzsl/main.py` (../shared/docs/d3gzsl.md §5).

A call of `critic_step` is one critic step on one real batch: L_D (WGAN-GP) + L_D3 on fresh
synthetic unseen rows, with G frozen; Adam steps D, the student and the sigmoid. `generator_step`
reuses the last critic batch with fresh noise: L_G = -mean D(G(z, a), a) + L_D3 (its synthetic
rows carry gradient to G), with D frozen; Adam steps G, the student and the sigmoid. The family's
train_step runs `critic_step` on every batch and `generator_step` after every n_critic-th, so an
iteration is n_critic batches (the authors draw n_critic random batches per iteration).

The teacher is frozen (requires_grad False) and is never stepped here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from dedn.families.d3gzsl.losses import D3Weights, LossForm, critic_loss, d3_loss
from dedn.families.d3gzsl.nets import Critic, Generator, OODSigmoid, Student, Teacher

__all__ = ["D3Nets", "StepConfig", "critic_step", "generator_step", "OPTIMIZED_BY"]

# which optimiser steps which network, per step kind (the authors' separate Adams)
OPTIMIZED_BY = {
    "critic": ("critic", "student", "sigmoid"),
    "generator": ("generator", "student", "sigmoid"),
}


@dataclass
class D3Nets:
    generator: Generator
    critic: Critic
    teacher: Teacher
    student: Student
    sigmoid: OODSigmoid
    class_attributes: Tensor  # (K, d_a)
    seen_ids: Tensor  # (K_s,) sorted
    unseen_ids: Tensor  # (K_u,) sorted


@dataclass(frozen=True)
class StepConfig:
    weights: D3Weights = D3Weights()
    enabled: bool = True  # False: the plain conditional WGAN-GP (no student, no L_D3)
    syn_per_unseen: int = 5  # synthetic rows per unseen class for L_D3 (gzsl/: 5 -> 250 at CUB)
    gp_weight: float = 10.0
    form: LossForm = "method"


def _d3(nets: D3Nets, x_real: Tensor, y_real: Tensor, cfg: StepConfig, g: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
    """L_D3 on [G(z, a_u); x_real] with fresh noise; G stays in the graph (the caller freezes it or not)."""
    y_u = nets.unseen_ids.repeat_interleave(cfg.syn_per_unseen)
    x_u = nets.generator(nets.class_attributes[y_u], generator=g)
    x = torch.cat([x_u, x_real])
    y = torch.cat([y_u, y_real])
    real = torch.cat([torch.zeros_like(y_u, dtype=torch.bool), torch.ones_like(y_real, dtype=torch.bool)])
    e_s, logits, ood = nets.student(x)
    e_t, t_logits = nets.teacher(x)
    terms = d3_loss(student_emb=e_s, student_logits=logits, ood_repr=ood, teacher_emb=e_t, teacher_logits=t_logits,
                    labels=y, real=real, seen_ids=nets.seen_ids, sig_w=nets.sigmoid.w, sig_b=nets.sigmoid.b,
                    weights=cfg.weights, form=cfg.form)
    return terms.total, terms.parts()


def _step(optimizers: Mapping[str, torch.optim.Optimizer], kind: str, cfg: StepConfig) -> None:
    for name in OPTIMIZED_BY[kind]:
        if cfg.enabled or name in ("critic", "generator"):
            optimizers[name].step()


def critic_step(nets: D3Nets, optimizers: Mapping[str, torch.optim.Optimizer], x: Tensor, y: Tensor,
                cfg: StepConfig, g: torch.Generator | None = None) -> dict[str, Tensor]:
    """One critic step on the real batch (x (B, F), y (B,) seen class ids); returns the loss parts."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    att = nets.class_attributes[y]
    nets.generator.requires_grad_(False)
    try:
        with torch.no_grad():
            fake = nets.generator(att, generator=g)
        loss, parts = critic_loss(nets.critic, x, fake, att, cfg.gp_weight, g)
        parts = {"critic": loss.detach(), **parts}
        if cfg.enabled:
            d3, d3_parts = _d3(nets, x, y, cfg, g)
            loss = loss + d3
            parts.update({k: v.detach() for k, v in d3_parts.items()})
        loss.backward()
    finally:
        nets.generator.requires_grad_(True)
    _step(optimizers, "critic", cfg)
    return parts


def generator_step(nets: D3Nets, optimizers: Mapping[str, torch.optim.Optimizer], x: Tensor, y: Tensor,
                   cfg: StepConfig, g: torch.Generator | None = None) -> dict[str, Tensor]:
    """The generator step on the last critic batch, fresh noise; D frozen."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    att = nets.class_attributes[y]
    nets.critic.requires_grad_(False)
    try:
        g_adv = -nets.critic(nets.generator(att, generator=g), att).mean()
        loss, parts = g_adv, {"generator": g_adv.detach()}
        if cfg.enabled:
            d3, d3_parts = _d3(nets, x, y, cfg, g)
            loss = loss + d3
            parts.update({f"g_{k}": v.detach() for k, v in d3_parts.items()})
        loss.backward()
    finally:
        nets.critic.requires_grad_(True)
    _step(optimizers, "generator", cfg)
    return parts
