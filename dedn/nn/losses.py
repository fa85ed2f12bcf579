"""DEDN training objective, Rao et al., IJCAI 2024, eqs. 7, 12, 15-18 (+ the reference code's form).

Paper variant: MAL (eq. 15) with margin epsilon; alignment (eq. 7) and distillation
(eq. 12) as JSD + the mean squared error the text names. Reference variant
(docs/reference-variant.md#mal-as-coded): MAL as coded (z = s + 1[seen] - m 1[k = y]),
distillation on the biased class scores (-1 seen, +1 unseen;
docs/reference-variant.md#distillation-on-biased-scores). `cfg.distance` picks the term: "mse" (paper text,
mean over entries), "sse" (the equations as typeset, summed over entries) or "cubic" (reference).
Classes outside `protocol.active_mask()` are excluded from every class softmax.
All losses are computed in float32 (float64 if the inputs are), outside autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F_
from torch import Tensor


REFERENCE_BIAS = 1.0  # the reference code's calibration bias: +1 on seen logits in MAL, -1/+1 at distillation


def _acc(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _mask_inactive(z: Tensor, active: Tensor) -> Tensor:
    return z.masked_fill(~active, float("-inf"))  # excluded from the softmax


def mal_loss(scores: Tensor, labels: Tensor, seen: Tensor, active: Tensor, epsilon: float) -> Tensor:
    """Eq. 15: z_y = P_y - 2 eps, z_k = P_k + eps (seen k != y), z_k = P_k (unseen); batch mean CE.

    scores (B, K); labels (B,) int; seen, active (K,) bool.
    """
    p = _acc(scores)
    z = p + epsilon * seen.to(p.dtype)  # (B, K)
    onehot = F_.one_hot(labels, p.shape[1]).bool()  # (B, K)
    z = torch.where(onehot, p - 2.0 * epsilon, z)
    return F_.cross_entropy(_mask_inactive(z, active), labels)


def reference_mal_loss(scores: Tensor, labels: Tensor, seen: Tensor, active: Tensor, margin: float) -> Tensor:
    """MAL as the reference code has it: z_k = s_k + 1[k seen] * bias - m 1[k = y]; batch mean CE."""
    p = _acc(scores)
    z = p + REFERENCE_BIAS * seen.to(p.dtype) - margin * F_.one_hot(labels, p.shape[1]).to(p.dtype)
    return F_.cross_entropy(_mask_inactive(z, active), labels)


def cross_entropy_loss(scores: Tensor, labels: Tensor, active: Tensor) -> Tensor:
    """Plain cross-entropy over the active classes (Table 3 "w/o L_mal", eq. 13)."""
    return F_.cross_entropy(_mask_inactive(_acc(scores), active), labels)


def _select(a: Tensor, b: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The last dim's entries of `mask`: a bool mask, or the ascending ids it keeps (`ClassProtocol.active_index`:
    the same columns in the same order, without the wait for the count a bool index costs on a GPU)."""
    if mask is None:
        return a, b
    if mask.dtype == torch.bool:
        return a[..., mask], b[..., mask]
    return a.index_select(-1, mask), b.index_select(-1, mask)


def jsd(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Jensen-Shannon divergence of softmax(a) and softmax(b) over the last dim, batch mean.

    0.5 (KL(p || m) + KL(q || m)), m = (p + q) / 2, KL summed over the last dim and averaged
    over rows. `mask` (last dim, bool) excludes entries from the softmax.
    """
    a, b = _select(_acc(a), _acc(b), mask)
    lp, lq = F_.log_softmax(a, -1), F_.log_softmax(b, -1)
    lm = torch.logaddexp(lp, lq) - math.log(2.0)  # log m (a Python constant: no tensor made each step)
    kl_p = (lp.exp() * (lp - lm)).sum(-1)
    kl_q = (lq.exp() * (lq - lm)).sum(-1)
    return 0.5 * (kl_p.mean() + kl_q.mean())


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """(1/B) sum_b ||a_b - b_b||_2^2: eqs. 7, 12 as typeset ("sse")."""
    d = _acc(a) - _acc(b)
    return d.pow(2).sum(-1).mean()


def mean_squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """(1/(B N)) sum_b ||a_b - b_b||_2^2 over N entries: the "Mean Squared Error" the paper's text names ("mse").

    Why the mean and not the typeset sum: class scores P = O A^T carry a per-expert offset
    (A's rows sum to ~8 on CUB), so the summed form starts near 5e3-5e4 on 200 classes, and
    RMSprop then spends every step on it: on semi-synthetic CUB validation H is 0.045 with the
    summed form against 0.237 with the mean (0.314 without distillation; tests/test_engine.py,
    docs/method.md#divergence-and-distance-terms). The mean keeps it at the scale of MAL.
    """
    d = _acc(a) - _acc(b)
    return d.pow(2).mean()


def cubic_distance(a: Tensor, b: Tensor) -> Tensor:
    """Reference code: (1/B) sum_b sum_k |d_k|^3 / ||d_b||_2, d = a - b (0 where d_b = 0)."""
    d = _acc(a) - _acc(b)
    sq = d.pow(2).sum(-1, keepdim=True)  # (B, 1)
    norm = sq.clamp_min(torch.finfo(d.dtype).tiny).sqrt()  # the clamp keeps the gradient finite at d = 0
    return (d.abs().pow(3) / norm).sum(-1).mean()


DISTANCE_TERMS = {"mse": mean_squared_distance, "sse": squared_distance, "cubic": cubic_distance}


def distance(a: Tensor, b: Tensor, kind: str, mask: Tensor | None = None) -> Tensor:
    """JSD + the mean squared ("mse"), summed squared ("sse") or cubic term, over the (masked) last dim."""
    term = DISTANCE_TERMS[kind]
    a, b = _select(a, b, mask)
    return jsd(a, b) + term(a, b)


def biased_scores(scores: Tensor, seen: Tensor, unseen: Tensor) -> Tensor:
    """Reference calibration bias: P - 1 on seen classes, P + 1 on unseen classes."""
    p = _acc(scores)
    return p - REFERENCE_BIAS * seen.to(p.dtype) + REFERENCE_BIAS * unseen.to(p.dtype)


def calibration_loss(scores: Tensor, seen: Tensor, unseen: Tensor, active: Tensor,
                     unseen_index: Tensor | None = None) -> Tensor:
    """Self-calibration (DAZLE): -log(mean_b total softmax probability of the unseen classes).

    Softmax over the active classes of the biased scores (as DAZLE and the reference code);
    computed in log space so a vanishing unseen mass cannot give log(0).
    """
    z = _mask_inactive(biased_scores(scores, seen, unseen), active)  # (B, K)
    zu = z[:, unseen] if unseen_index is None else z.index_select(1, unseen_index)  # the same columns
    log_mass = torch.logsumexp(zu, -1) - torch.logsumexp(z, -1)  # (B,) log unseen mass
    return -(torch.logsumexp(log_mass, 0) - math.log(z.shape[0]))
