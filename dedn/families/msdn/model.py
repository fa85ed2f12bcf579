"""MSDN: Mutually Semantic Distillation Network, Chen et al., CVPR 2022, as its authors' code implements it.

Spec: docs/msdn.md (the authors' code, github.com/shiming-chen/MSDN @ ec3598b). Indices b batch, i attribute (D),
r region (R), k class (K), g word dimension (G), c channel (C).

* attribute->visual sub-net (§2): s1 = V W1 F (B, D, R); alpha = softmax_r(V W2 F);
  F_hat[b, i] = sum_r alpha[b, i, r] f_r (B, D, C); psi1[b, i] = v_i^T W1 F_hat[b, i] (B, D).
* visual->attribute sub-net (§3): s2[b, r, i] = f_r^T W1_1 v_i; beta = softmax_i(V W2_1 F);
  psi2[b, i] = sum_r beta[b, i, r] s2[b, r, i] (a plain sum over r: beta is NOT normalised over r).
* class scores S^j = psi_j A^T + m, m_k = +1 unseen / -1 seen (§2, §3).
* loss (§4): (CE_1 + lam Cal_1) + (CE_2 + lam Cal_2) + gamma (cubic(S1 - S2) + JSD(S1, S2)).
* inference (§6): w1 S1 + w2 S2 (w1 + w2 = 1) with the +-1 margin = calibrated stacking by 2.

How it is computed (no (B, D, C) tensor is ever formed)
--------------------------------------------------------
The spec writes psi1 through F_hat (B, D, C): 128 MB at CUB shapes (B=50, D=312, C=2048) that
would go through a product and its backward. By associativity

    psi1[b, i] = v_i^T W1 (sum_r alpha[b, i, r] f_r) = sum_r alpha[b, i, r] (M1 F_b)[i, r],  M1 = V W1 (D, C)

which is exactly DEDN's region branch (eqs. 1-3): one GEMM of the stacked maps [M1; M2]
(2D, C) against the features with the batch folded into the columns (C, B*R), a softmax over R
and a row-wise sum (`dedn.nn.attention.region_branch`, reused). M1 is formed once per step
(D x G x C), not per sample. The "attention" softmax(..) F^T is therefore never materialised:
only its contraction with M1, which needs the (D, R) maps alone. An SDPA call would not help:
its keys are the R regions (R = 196) and its value dimension C = 2048 is the large one, so it
would write F_hat; here the value is contracted with M1 first, which is cheaper.

The visual->attribute branch has the same shape: s2 = N1 F with N1 = V W1_1^T (D, C), the
logits N2 F with N2 = V W2_1 (D, C), so one GEMM of [N1; N2] against the same (C, B*R) operand,
then a softmax over the D attributes (not over R) and a sum over R (`attribute_branch`).

Work per sample: four (D x C) @ (C x R) products -> 8 D C R FLOP forward; a training step
(forward + backward, counted as three forward passes) ~ 24 B D C R FLOP, plus 24 D G C for the
per-step maps V W (~3 % at CUB shapes; left out of the count like DEDN's benchmark does).

Parameters (§2, §3, §5): V (D, G) shared and trained, initialised row-L2-normalised (and
re-normalised at every forward when `normalize_word_vectors`, AWA2); W1 ~ N(0, 1) (G, C);
W2 = 0 (G, C); W1_1 = 0 (C, G); W2_1 = 0 (G, C). The authors' W3 (G, C) and W3_1 (C, G) are
zero, feed only commented-out code and never receive a gradient: they are NOT created here
(an unused parameter would also make DDP fail). Class attributes A (K, D) are a frozen buffer.

Integration with the pipeline: the model knows nothing of seen/unseen classes
(docs/design.md#model-families); the
+-1 margin is added by `msdn_loss` (from the `ClassProtocol`) and at evaluation by calibrated
stacking (`eval.calibration = 2.0`). The family (`dedn.families.msdn`) exposes S1 and S2 as
the score parts `S_av`, `S_va` and their weight as `eval.w1`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from dedn.nn.attention import compute_dtype, normalize_features, region_branch
from dedn.families.msdn.config import MSDNLossConfig, MSDNModelConfig
from dedn.errors import ConfigError
from dedn.nn.losses import biased_scores, calibration_loss, cross_entropy_loss, distance
from dedn.protocol import ClassProtocol

__all__ = ["MSDN", "MSDNOutput", "attribute_branch", "msdn_loss"]

Impl = Literal["fused", "direct"]


# ---- outputs ------------------------------------------------------------------------------
@dataclass
class MSDNOutput:
    """Both sub-nets' attribute scores; class scores are computed from them and `class_attributes`.

    psi_av (B, D): attribute->visual psi1; psi_va (B, D): visual->attribute psi2;
    attention_av (B, D, R) alpha (softmax over R) and attention_va (B, D, R) beta (softmax over D),
    region_semantics (B, R, G) V_hat = beta^T V: only when asked for; class_attributes A (K, D).
    Class scores here exclude the +-1 margin (the model has no seen/unseen knowledge).
    """

    psi_av: Tensor
    psi_va: Tensor
    class_attributes: Tensor
    attention_av: Tensor | None = None
    attention_va: Tensor | None = None
    region_semantics: Tensor | None = None

    def _scores(self, psi: Tensor) -> Tensor:
        a = self.class_attributes
        with torch.autocast(device_type=a.device.type, enabled=False):
            acc = torch.promote_types(psi.dtype, torch.float32)
            return psi.to(acc) @ a.to(acc).t()  # (B, K)

    @property
    def scores_av(self) -> Tensor:
        """S1 - m = psi1 A^T (B, K), float32 (or float64)."""
        return self._scores(self.psi_av)

    @property
    def scores_va(self) -> Tensor:
        """S2 - m = psi2 A^T (B, K), float32 (or float64)."""
        return self._scores(self.psi_va)

    def inference_scores(self, w1: float = 0.9) -> Tensor:
        """w1 S1 + (1 - w1) S2 (B, K) (docs/msdn.md#6-inference, margin left to calibrated stacking)."""
        return float(w1) * self.scores_av + (1.0 - float(w1)) * self.scores_va


# ---- the visual->attribute branch ---------------------------------------------------------
def attribute_branch(
    n12: Tensor, f_cbr: Tensor, batch: int, return_attention: bool = False
) -> tuple[Tensor, Tensor | None]:
    """§3 for D attributes: psi2[b, i] = sum_r softmax_i(N2 F_b)[i, r] * (N1 F_b)[i, r].

    n12: (2D, C) = [N1; N2] with N1 = V W1_1^T (score rows), N2 = V W2_1 (logit rows), compute dtype.
    f_cbr: (C, B*R) features with the batch folded into the columns (one GEMM, as region_branch).
    Returns psi2 (B, D) in >= float32 and, if asked, beta (B, D, R).
    """
    d = n12.shape[0] // 2
    r = f_cbr.shape[1] // batch
    z = torch.matmul(n12, f_cbr).view(2 * d, batch, r)  # (2D, B, R)
    acc = torch.promote_types(z.dtype, torch.float32)  # softmax and sums in >= fp32
    s = z[:d].to(acc)  # (D, B, R) s2, transposed to [i, b, r]
    beta = torch.softmax(z[d:].to(acc), dim=0)  # (D, B, R) softmax over ATTRIBUTES, per region
    psi = (beta * s).sum(-1).t()  # (B, D) plain sum over regions
    return psi, (beta.permute(1, 0, 2) if return_attention else None)


# ---- the network --------------------------------------------------------------------------
class MSDN(nn.Module):
    """Attribute->visual and visual->attribute sub-nets sharing V (see module docstring).

    word_vectors (D, G) are row-L2-normalised at init; class_attributes (K, D) become a frozen,
    row-normalised buffer; feature_shape (C, H, W). From `cfg` (the run's ModelConfig) it reads
    normalize_features and normalize_word_vectors (re-normalise V's rows each forward: AWA2). impl "fused" (default) never forms (B, D, C)
    tensors; "direct" follows the spec's formulas literally (tests, benchmark baseline).
    """

    def __init__(self, cfg: MSDNModelConfig, *, word_vectors: Tensor, class_attributes: Tensor,
                 feature_shape: tuple[int, int, int] | Sequence[int], impl: Impl = "fused"):
        super().__init__()
        word_vectors = torch.as_tensor(word_vectors)
        class_attributes = torch.as_tensor(class_attributes)
        dtype = word_vectors.dtype if word_vectors.dtype in (torch.float32, torch.float64) else torch.float32
        word_vectors, class_attributes = word_vectors.to(dtype), class_attributes.to(dtype)
        if word_vectors.ndim != 2:
            raise ConfigError("word_vectors", "a (D, G) matrix", tuple(word_vectors.shape), "MSDN")
        d, g = word_vectors.shape
        if class_attributes.ndim != 2 or class_attributes.shape[1] != d:
            raise ConfigError("class_attributes", f"a (K, {d}) matrix", tuple(class_attributes.shape), "MSDN")
        if len(feature_shape) != 3 or min(int(x) for x in feature_shape) < 1:
            raise ConfigError("feature_shape", "(C, H, W) positive", tuple(feature_shape), "MSDN")
        if impl not in ("fused", "direct"):
            raise ConfigError("impl", "one of fused|direct", impl, "MSDN")
        c, h, w = (int(x) for x in feature_shape)
        self.cfg, self.impl, self.feature_shape = cfg, impl, (c, h, w)
        self.v = nn.Parameter(F_.normalize(word_vectors, dim=1))  # (D, G) shared by both sub-nets
        self.w1 = nn.Parameter(torch.randn(g, c, dtype=dtype))  # (G, C) ~ N(0, 1)
        self.w2 = nn.Parameter(torch.zeros(g, c, dtype=dtype))  # (G, C) 0: uniform attention over R at init
        self.w1_1 = nn.Parameter(torch.zeros(c, g, dtype=dtype))  # (C, G) 0: S2 = margin only at init
        self.w2_1 = nn.Parameter(torch.zeros(g, c, dtype=dtype))  # (G, C) 0: uniform attention over D at init
        self.register_buffer("class_attributes", F_.normalize(class_attributes, dim=1), persistent=True)  # (K, D)

    def word_vectors(self) -> Tensor:
        """V (D, G) as used in the forward pass (re-normalised per call on AWA2)."""
        return F_.normalize(self.v, dim=1) if self.cfg.normalize_word_vectors else self.v

    def forward(self, features: Tensor, return_attention: bool = False) -> MSDNOutput:
        """features (B, C, H, W) -> MSDNOutput."""
        if features.ndim != 4 or tuple(features.shape[1:]) != self.feature_shape:
            raise ConfigError("features", f"(B, {', '.join(map(str, self.feature_shape))})",
                              tuple(features.shape), "MSDN.forward")
        f = normalize_features(features, self.cfg.normalize_features)  # (B, C, R)
        if f.dtype not in (torch.float32, torch.float64):
            f = f.float()
        v = self.word_vectors()  # (D, G)
        if self.impl == "direct":
            psi1, psi2, alpha, beta = self._direct(v, f)
        else:
            psi1, psi2, alpha, beta = self._fused(v, f, return_attention)
        sem = None
        if return_attention:
            with torch.autocast(device_type=f.device.type, enabled=False):
                sem = torch.einsum("bir,ig->brg", beta.to(v.dtype), v)  # (B, R, G) V_hat, unused by any loss
        return MSDNOutput(psi_av=psi1, psi_va=psi2, class_attributes=self.class_attributes,
                          attention_av=alpha if return_attention else None,
                          attention_va=beta if return_attention else None, region_semantics=sem)

    def _fused(self, v: Tensor, f: Tensor, return_attention: bool):
        b, c, r = f.shape
        cdt = compute_dtype(f)
        m12 = torch.cat([v @ self.w1, v @ self.w2], 0).to(cdt)  # (2D, C) [M1; M2]
        n12 = torch.cat([v @ self.w1_1.t(), v @ self.w2_1], 0).to(cdt)  # (2D, C) [N1; N2]
        f_cbr = f.to(cdt).transpose(0, 1).reshape(c, b * r)  # (C, B*R): batch folded into columns
        psi1, alpha = region_branch(m12, f_cbr, b, return_attention)  # (B, D), (B, D, R) | None
        psi2, beta = attribute_branch(n12, f_cbr, b, return_attention)  # (B, D), (B, D, R) | None
        return psi1, psi2, alpha, beta

    def _direct(self, v: Tensor, f: Tensor):
        """The spec's formulas one by one, materialising F_hat (B, D, C) and s2 (B, R, D)."""
        alpha = torch.softmax(torch.einsum("ig,gc,bcr->bir", v, self.w2, f), dim=-1)  # (B, D, R) over r
        f_hat = torch.einsum("bir,bcr->bic", alpha, f)  # (B, D, C) attribute-based visual features
        psi1 = torch.einsum("ig,gc,bic->bi", v, self.w1, f_hat)  # (B, D) v_i^T W1 F_hat[b, i]
        s2 = torch.einsum("bcr,cg,ig->bri", f, self.w1_1, v)  # (B, R, D) f_r^T W1_1 v_i
        beta = torch.softmax(torch.einsum("ig,gc,bcr->bir", v, self.w2_1, f), dim=1)  # (B, D, R) over i
        psi2 = torch.einsum("bir,bri->bi", beta, s2)  # (B, D)
        return psi1, psi2, alpha, beta


# ---- objective ------------------------------------------------------------------------------
def msdn_loss(out: MSDNOutput, labels: Tensor, protocol: ClassProtocol, cfg: MSDNLossConfig) -> dict[str, Tensor]:
    """docs/msdn.md#4-losses: (CE_1 + lam Cal_1) + (CE_2 + lam Cal_2) + gamma (cubic + JSD)(S1, S2).

    labels (B,) int class ids. lam = cfg.calibration_weight, gamma = cfg.gamma (0 or
    cfg.distill false: no distillation), cfg.distance the term (authors: cubic). Returns {'loss',
    'ce_av', 'ce_va', and when their weight is > 0: 'cal_av', 'cal_va', 'distill'} (unweighted
    parts). "All K classes" of the spec = the protocol's active classes (all K in the final
    phase; selection excludes the test-unseen classes as the pipeline requires). CE uses the
    scores without the margin, Cal and the distillation the scores with it (seen -1, unseen +1,
    `dedn.nn.losses.biased_scores`). Where the authors' cubic term is NaN (S1 = S2 for a sample),
    `dedn.nn.losses.cubic_distance` gives 0.
    """
    dev = out.class_attributes.device
    seen, unseen, active = protocol.seen_mask(dev), protocol.unseen_mask(dev), protocol.active_mask(dev)
    labels = labels.to(dev).long()
    lam, gamma = float(cfg.calibration_weight), float(cfg.gamma)
    parts: dict[str, Tensor] = {}
    with torch.autocast(device_type=dev.type, enabled=False):
        s1, s2 = out.scores_av, out.scores_va  # (B, K) each, margin excluded
        parts["ce_av"] = cross_entropy_loss(s1, labels, active)
        parts["ce_va"] = cross_entropy_loss(s2, labels, active)
        total = parts["ce_av"] + parts["ce_va"]
        if lam > 0:
            parts["cal_av"] = calibration_loss(s1, seen, unseen, active, protocol.unseen_index(dev))
            parts["cal_va"] = calibration_loss(s2, seen, unseen, active, protocol.unseen_index(dev))
            total = total + lam * (parts["cal_av"] + parts["cal_va"])
        if gamma > 0 and cfg.distill:
            # both directions get gradients: no teacher, no stop-gradient (docs/msdn.md#4-losses)
            parts["distill"] = distance(biased_scores(s1, seen, unseen), biased_scores(s2, seen, unseen),
                                        cfg.distance, mask=protocol.active_index(dev))
            total = total + gamma * parts["distill"]
    return {"loss": total, **parts}
