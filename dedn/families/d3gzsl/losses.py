"""D3GZSL's losses (Wang et al., AAAI 2024; facts: ../shared/docs/d3gzsl.md §4, docs/d3gzsl.md).

Notation: B real seen rows, N = |U| + B rows in X = [U; R] (generated unseen, then real), K
classes, K_s seen classes. BCEL(s, t) = softplus(s) - t s, the binary cross-entropy with logits.

* `pairwise_bce_cos(a, b, same)`: mean over all ordered pairs (i, j) of BCEL((1 + cos(a_i, b_j))/2,
  same_ij), the form of both batch-pairwise terms (L_be in embedding space, L_od on the 2-d OOD
  representation). Computed as one GEMM of row-normalised matrices: a B x B (or N x N) matrix,
  never the B x B x 2048 pair tensor the authors' `gzsl/` builds. Every norm has an eps, so an
  all-zero ReLU row gives cos 0, not NaN.
* `d3_loss`: L_cls, L_kl, L_be, L_od and their weighted sum (§4 step 7).
* `critic_loss`: the WGAN-GP critic loss with its gradient penalty (§5).

Two forms (`LossForm`), selected by the run's variant:
* "method" (default): the method as described, with the slips of the code fixed: L_kl compares the
  teacher's and the student's seen-class distributions directly, and L_od's teacher side is
  [c, 1 - c] itself, with no second softmax over values that are already probabilities.
* "reference": the authors' `gzsl/` code: softmax of p^T against softmax of q in L_kl, and
  softmax([c, 1 - c]) in L_od.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EPS", "LossForm", "D3Weights", "pairwise_bce_cos", "kl_seen", "d3_loss", "critic_loss"]

EPS = 1e-8  # in every cosine: a row's norm is clamped to at least EPS
LossForm = Literal["method", "reference"]


@dataclass(frozen=True)
class D3Weights:
    """alpha_cls, alpha_od, alpha_kd of L_D3 = a_cls L_cls + a_od L_od + a_kd (L_be + L_kl)."""

    cls: float = 1e-4
    od: float = 1e-4
    kd: float = 1e-4


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS)


def pairwise_bce_cos(a: Tensor, b: Tensor, same: Tensor) -> Tensor:
    """mean_{i,j} BCEL(s_ij, same_ij) with s_ij = (1 + cos(a_i, b_j)) / 2; a (M, d), b (M', d), same (M, M') bool.

    BCEL(s, t) = softplus(s) - t s: one (M, M') GEMM, no pair tensor.
    """
    s = 0.5 * (1.0 + _unit_rows(a) @ _unit_rows(b).T)
    return (F.softplus(s) - same.to(s.dtype) * s).mean()


def same_class(y_rows: Tensor, y_cols: Tensor) -> Tensor:
    """(M, M') bool: 1[y_i = y_j]."""
    return y_rows[:, None] == y_cols[None, :]


def kl_seen(teacher_probs: Tensor, student_seen_logits: Tensor, form: LossForm = "method") -> Tensor:
    """L_kl: (1/B) sum_i KL(P_i || Q_i) over the real rows.

    method: P = p^T (the teacher's softmax over the K_s seen classes), Q = softmax of the student's
    logits at the seen classes. reference: P = softmax(p^T), Q = softmax(softmax(...)) as the code does.
    """
    log_q = F.log_softmax(student_seen_logits, dim=1)
    p = teacher_probs
    if form == "reference":
        p = F.softmax(p, dim=1)
        log_q = F.log_softmax(log_q.exp(), dim=1)
    return (p * (p.clamp_min(1e-30).log() - log_q)).sum(dim=1).mean()


@dataclass
class D3Terms:
    """The four terms and their weighted sum (scalars, in the autograd graph)."""

    total: Tensor
    cls: Tensor
    kl: Tensor
    be: Tensor
    od: Tensor

    def parts(self) -> dict[str, Tensor]:
        return {"d3": self.total, "d3_cls": self.cls, "d3_kl": self.kl, "d3_be": self.be, "d3_od": self.od}


def d3_loss(*, student_emb: Tensor, student_logits: Tensor, ood_repr: Tensor, teacher_emb: Tensor,
            teacher_logits: Tensor, labels: Tensor, real: Tensor | slice, seen_ids: Tensor, sigmoid: "torch.nn.Module",
            weights: D3Weights, form: LossForm = "method") -> D3Terms:
    """L_D3 over X = rows of one batch (generated unseen and real seen rows, in any order).

    student_emb e^S (N, E), student_logits l^S (N, K), ood_repr g = H(log_softmax(l^S)) (N, 2),
    teacher_emb e^T (N, E) and teacher_logits (N, K_s) of the frozen teacher (still differentiable
    w.r.t. X), labels (N,) global class ids, real (N,) bool or a slice (the ID rows, where L_kl and
    L_be are taken; the training step's are a tail, sliced without a host wait), seen_ids (K_s,) the seen class ids in the teacher's output order, sigmoid the learnable
    c = sigmoid(w (m + b)) (called once, so a DDP wrapper around it syncs its gradient).
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):  # fp32, as DEDN's and MSDN's
        return _d3_loss(student_emb.float(), student_logits.float(), ood_repr.float(), teacher_emb.float(),
                        teacher_logits.float(), labels, real, seen_ids, sigmoid, weights, form)


def _d3_loss(student_emb: Tensor, student_logits: Tensor, ood_repr: Tensor, teacher_emb: Tensor,
             teacher_logits: Tensor, labels: Tensor, real: Tensor | slice, seen_ids: Tensor, sigmoid: "torch.nn.Module",
             weights: D3Weights, form: LossForm) -> D3Terms:
    l_cls = F.cross_entropy(student_logits, labels)
    log_pt = F.log_softmax(teacher_logits, dim=1)
    r = real
    l_kl = kl_seen(log_pt[r].exp(), student_logits[r][:, seen_ids], form)
    l_be = pairwise_bce_cos(teacher_emb[r], student_emb[r], same_class(labels[r], labels[r]))
    m = log_pt.max(dim=1).values  # log max-softmax probability of the teacher, <= 0 ("energy" in the code)
    c = sigmoid(m)
    v = torch.stack([c, 1.0 - c], dim=1)
    if form == "reference":
        v = F.softmax(v, dim=1)
    u = F.softmax(ood_repr, dim=1)
    l_od = pairwise_bce_cos(u, v, same_class(labels, labels))
    total = weights.cls * l_cls + weights.od * l_od + weights.kd * (l_be + l_kl)
    return D3Terms(total, l_cls, l_kl, l_be, l_od)


def critic_loss(critic: "torch.nn.Module", real: Tensor, fake: Tensor, att: Tensor, gp_weight: float = 10.0,
                generator: torch.Generator | None = None, *, critic_module: "torch.nn.Module | None" = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """L_D = mean D(fake) - mean D(real) + gp_weight * mean_i (||grad_x D(x~_i, a_i)||_2 - 1)^2.

    x~ = alpha x + (1 - alpha) x_fake with alpha ~ U(0, 1) per row; the gradient is w.r.t. the
    feature only and stays in the graph, so the penalty trains D. fake is detached (a critic step
    never trains G). The critic sees [real; fake; x~] in one forward (the same values as three
    calls; a DDP wrapper around it is called once per step) and the penalty's gradient comes from
    `Critic.feature_gradient` on x~'s pre-activations. critic_module: the Critic itself when
    `critic` is a wrapper around it.
    """
    net = critic_module if critic_module is not None else critic
    b = real.shape[0]
    alpha = torch.rand(b, 1, device=real.device, dtype=real.dtype, generator=generator)
    mix = alpha * real.detach() + (1.0 - alpha) * fake.detach()
    out, h = critic(torch.cat([real, fake.detach(), mix]), att.repeat(3, 1), with_hidden=True)
    out = out.float()  # the means and the penalty in fp32 under bf16 autocast (no-ops in fp32)
    d_real, d_fake = out[:b].mean(), out[b:2 * b].mean()
    grad = net.feature_gradient(h[2 * b:]).float()
    gp = ((grad.norm(dim=1) - 1.0) ** 2).mean()
    return d_fake - d_real + gp_weight * gp, {"wasserstein": (d_real - d_fake).detach(), "gp": gp.detach()}
