"""One D3GZSL update in the order of the authors' `gzsl/main.py` (../shared/docs/d3gzsl.md §5).

`critic_step` is one critic step on one real batch: L_D (WGAN-GP) + L_D3 on fresh synthetic
unseen rows, with G frozen; Adam steps D, the student and the sigmoid. `generator_step` reuses the
last critic batch with fresh noise: L_G = -mean D(G(z, a), a) + L_D3 (its synthetic rows carry
gradient to G), with D frozen; Adam steps G, the student and the sigmoid. The family's train_step
runs `critic_step` on every batch and `generator_step` after every n_critic-th, so an iteration is
n_critic batches (the authors draw n_critic random batches per iteration).

Distributed training: each trained network is called through its own DDP wrapper exactly once per
step in which it is trained (the critic sees [real; fake; mix] in one call, the generator makes
the adversarial and the synthetic unseen rows in one call), so DDP's gradient all-reduce runs in
the backward pass. A frozen network is called bare (`generator_raw` in a critic step, `critic_raw`
in the generator step, the teacher always): its parameters get no gradient and need no sync. A
critic step makes its synthetic rows without autograd: G is frozen there and nothing flows to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from dedn.families.d3gzsl.losses import D3Weights, LossForm, critic_loss, d3_loss

__all__ = ["D3Nets", "StepConfig", "critic_step", "generator_step", "OPTIMIZED_BY"]

# which optimiser steps which network, per step kind (the authors' separate Adams)
OPTIMIZED_BY = {
    "critic": ("critic", "student", "sigmoid"),
    "generator": ("generator", "student", "sigmoid"),
}


@dataclass
class D3Nets:
    """The networks one step uses: trained ones possibly DDP-wrapped, frozen ones bare."""

    generator: nn.Module  # trained in the generator step (wrapped)
    critic: nn.Module  # trained in the critic step (wrapped)
    teacher: nn.Module  # frozen
    student: nn.Module  # wrapped
    sigmoid: nn.Module  # wrapped
    class_attributes: Tensor  # (K, d_a)
    seen_ids: Tensor  # (K_s,) sorted: the teacher's output order
    unseen_ids: Tensor  # (K_u,) sorted
    generator_raw: nn.Module | None = None  # the generator itself (frozen in a critic step); default `generator`
    critic_raw: nn.Module | None = None  # the critic itself (frozen in the generator step); default `critic`

    def __post_init__(self) -> None:
        self.generator_raw = self.generator_raw or self.generator
        self.critic_raw = self.critic_raw or self.critic


@dataclass(frozen=True)
class StepConfig:
    weights: D3Weights = D3Weights()
    enabled: bool = True  # False: the plain conditional WGAN-GP (no student, no L_D3)
    syn_per_unseen: int = 5  # synthetic rows per unseen class for L_D3 (gzsl/: 5 -> 250 at CUB)
    gp_weight: float = 10.0
    form: LossForm = "method"


def _d3(nets: D3Nets, x_u: Tensor, y_u: Tensor, x_real: Tensor, y_real: Tensor, cfg: StepConfig
        ) -> tuple[Tensor, dict[str, Tensor]]:
    """L_D3 on X = [x_u; x_real]."""
    x = torch.cat([x_u, x_real])
    y = torch.cat([y_u, y_real])
    real = slice(y_u.shape[0], None)  # the real rows are the tail: a slice, where a bool mask made a GPU wait six times
    e_s, logits, ood = nets.student(x)
    e_t, t_logits = nets.teacher(x)
    terms = d3_loss(student_emb=e_s, student_logits=logits, ood_repr=ood, teacher_emb=e_t, teacher_logits=t_logits,
                    labels=y, real=real, seen_ids=nets.seen_ids, sigmoid=nets.sigmoid, weights=cfg.weights,
                    form=cfg.form)
    return terms.total, terms.parts()


Check = Callable[[Mapping[str, Tensor]], dict[str, float]]


def _floats(parts: Mapping[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in parts.items()}


def _step(optimizers: Mapping[str, torch.optim.Optimizer], kind: str, cfg: StepConfig) -> None:
    for name in OPTIMIZED_BY[kind]:
        if cfg.enabled or name in ("critic", "generator"):
            optimizers[name].step()


def critic_step(nets: D3Nets, optimizers: Mapping[str, torch.optim.Optimizer], x: Tensor, y: Tensor,
                cfg: StepConfig, g: torch.Generator | None = None, check: Check = _floats) -> dict[str, float]:
    """One critic step on the real batch (x (B, F), y (B,) seen class ids); returns the loss parts.

    `check` turns the parts into floats before the backward pass (StepContext.check_finite stops
    on NaN/inf there, before any update)."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    att = nets.class_attributes[y]
    y_u = nets.unseen_ids.repeat_interleave(cfg.syn_per_unseen) if cfg.enabled else y[:0]
    with torch.no_grad():  # G is frozen in a critic step: its rows are inputs here
        fake = nets.generator_raw(torch.cat([att, nets.class_attributes[y_u]]), generator=g)
    loss, parts = critic_loss(nets.critic, x, fake[:len(y)], att, cfg.gp_weight, g, critic_module=nets.critic_raw)
    parts = {"critic": loss.detach(), **parts}
    if cfg.enabled:
        d3, d3_parts = _d3(nets, fake[len(y):], y_u, x, y, cfg)
        loss = loss + d3
        parts.update({k: v.detach() for k, v in d3_parts.items()})
    values = check(parts)
    loss.backward()
    _step(optimizers, "critic", cfg)
    return values


def generator_step(nets: D3Nets, optimizers: Mapping[str, torch.optim.Optimizer], x: Tensor, y: Tensor,
                   cfg: StepConfig, g: torch.Generator | None = None, check: Check = _floats) -> dict[str, float]:
    """The generator step on the last critic batch, fresh noise; D frozen (requires_grad off, called bare)."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    att = nets.class_attributes[y]
    y_u = nets.unseen_ids.repeat_interleave(cfg.syn_per_unseen) if cfg.enabled else y[:0]
    critic = nets.critic_raw
    assert critic is not None
    critic.requires_grad_(False)
    try:
        fake = nets.generator(torch.cat([att, nets.class_attributes[y_u]]), generator=g)
        g_adv = -critic(fake[:len(y)], att).mean()
        loss, parts = g_adv, {"generator": g_adv.detach()}
        if cfg.enabled:
            d3, d3_parts = _d3(nets, fake[len(y):], y_u, x, y, cfg)
            loss = loss + d3
            parts.update({f"g_{k}": v.detach() for k, v in d3_parts.items()})
        values = check(parts)
        loss.backward()
    finally:
        critic.requires_grad_(True)
    _step(optimizers, "generator", cfg)
    return values
