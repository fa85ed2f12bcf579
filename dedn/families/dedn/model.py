"""DEDN: Dual Expert Distillation Network, Rao et al., IJCAI 2024, eqs. 1-11, 8 and 19.

cExp is one DAN sub-network (dedn.nn.attention) over all D attributes; fExp is Q sub-networks,
one per attribute cluster, whose outputs are scattered back to the original attribute order
(eq. 10's concatenation, undone so that P = O A^T uses A as given).

Speed: every sub-network of both experts contributes its rows to ONE stacked matrix per
branch, so the features are multiplied once per step for everything
(docs/performance.md#the-fused-form):
region branch = one GEMM of [M1; M2] (all rows) against F; channel branch = one blocked
attention call. Parameters stay separate per sub-network (each owns its V_q and W's).
`impl="loop"` runs the same kernels one sub-network at a time and `impl="direct"` runs
the paper's materialising form one sub-network at a time (tests, benchmark baselines).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from dedn.nn.attention import channel_branch, compute_dtype, dan_direct, normalize_features, region_branch
from dedn.data.clusters import apply_cluster_layout
from dedn.families.dedn.config import DEDNModelConfig as ModelConfig
from dedn.errors import ConfigError

Impl = Literal["fused", "loop", "direct"]
PART_NAMES = ("P_rc", "P_cc", "P_rf", "P_cf")  # region/channel x coarse/fine


# ---- outputs --------------------------------------------------------------------------
@dataclass
class ExpertOutput:
    """One expert's outputs, attributes in the ORIGINAL order.

    o_region (B, D) O_r; o_channel (B, D) O_c, or None without channel attention;
    scores (B, K) = (O_r + O_c) A^T (the training combination); region_attention (B, D, R)
    when asked for.
    """

    o_region: Tensor
    o_channel: Tensor | None
    scores: Tensor
    region_attention: Tensor | None = None


@dataclass
class DEDNOutput:
    """Both experts' outputs (None for an ablated expert) and the class attributes A (K, D)."""

    coarse: ExpertOutput | None
    fine: ExpertOutput | None
    class_attributes: Tensor

    def score_parts(self) -> dict[str, Tensor]:
        """The four (B, K) parts O A^T: P_rc, P_cc (coarse region/channel), P_rf, P_cf (fine).

        Absent parts (ablated expert, no channel attention) are omitted, never zero-filled.
        Computed in float32 (or float64) outside autocast.
        """
        a = self.class_attributes
        parts: dict[str, Tensor] = {}
        with torch.autocast(device_type=a.device.type, enabled=False):
            for tag, ex in (("c", self.coarse), ("f", self.fine)):
                if ex is None:
                    continue
                acc = torch.promote_types(ex.o_region.dtype, torch.float32)
                parts[f"P_r{tag}"] = ex.o_region.to(acc) @ a.to(acc).t()  # (B, K)
                if ex.o_channel is not None:
                    parts[f"P_c{tag}"] = ex.o_channel.to(acc) @ a.to(acc).t()  # (B, K)
        return parts

    def inference_scores(self, lambda_rc: float, lambda_e: float) -> Tensor:
        """Eq. 8 within each expert, then eq. 19 across experts -> (B, K)."""
        return combine_score_parts(self.score_parts(), lambda_rc, lambda_e)


def combine_score_parts(parts: dict[str, Tensor], lambda_rc: float, lambda_e: float) -> Tensor:
    """lambda_e (lambda_rc P_rc + (1 - lambda_rc) P_cc) + (1 - lambda_e) (... fine ...).

    Eqs. 8 and 19 on the cached parts (they are linear, so combining scores equals combining
    O's). Without channel parts an expert's score is its region part alone (lambda_rc is then
    irrelevant); with one expert its score alone (lambda_e irrelevant). Works on (..., K)
    tensors of any leading shape.
    """
    experts = []
    for tag in ("c", "f"):
        r = parts.get(f"P_r{tag}")
        if r is None:
            continue
        c = parts.get(f"P_c{tag}")
        experts.append(r if c is None else lambda_rc * r + (1.0 - lambda_rc) * c)
    if not experts:
        raise ValueError("combine_score_parts: no score parts (expected P_rc and/or P_rf)")
    if len(experts) == 1:
        return experts[0]
    return lambda_e * experts[0] + (1.0 - lambda_e) * experts[1]


# ---- one DAN sub-network ---------------------------------------------------------------
class DANSubnet(nn.Module):
    """Parameters of one DAN sub-network (eqs. 1-6): its own word vectors V_q and W1..W4.

    W1, W3 ~ N(0, 1); W2, W4 = 0 so both attentions start uniform; no biases. With
    `region_rank` > 0, W1 = W1a W1b (reference code, SUN): W1a ~ N(0, 1) and W1b ~ N(0, 1/rank)
    (`region_init="scaled"`, W1's entries unit-variance like the full-rank W1) or W1b ~ N(0, 1)
    (`region_init="unit"`, as the reference code starts both factors; W1's entries then have
    variance rank, std 16 at rank 256). Both draw the same random numbers.
    """

    def __init__(self, word_vectors: Tensor, channels: int, regions: int, *, channel_attention: bool, region_rank: int = 0,
                 region_init: str = "scaled"):
        super().__init__()
        g = word_vectors.shape[1]
        self.v = nn.Parameter(word_vectors.detach().clone())  # (D_q, G), trained, never renormalised
        self.region_rank = region_rank
        if region_rank > 0:
            self.w1a = nn.Parameter(torch.randn(g, region_rank, dtype=word_vectors.dtype))  # (G, rank)
            if region_init not in ("scaled", "unit"):
                raise ConfigError("model.region_init", "one of scaled|unit", region_init, "DANSubnet")
            w1b = torch.randn(region_rank, channels, dtype=word_vectors.dtype)  # (rank, C)
            if region_init == "scaled":  # 1/sqrt(rank) keeps entries of W1a W1b at unit variance, like the full-rank W1
                w1b = w1b / math.sqrt(region_rank)
            self.w1b = nn.Parameter(w1b)
        else:
            self.w1 = nn.Parameter(torch.randn(g, channels, dtype=word_vectors.dtype))  # (G, C)
        self.w2 = nn.Parameter(torch.zeros(g, channels, dtype=word_vectors.dtype))  # (G, C)
        self.channel_attention = channel_attention
        if channel_attention:
            self.w3 = nn.Parameter(torch.randn(g, regions, dtype=word_vectors.dtype))  # (G, R)
            self.w4 = nn.Parameter(torch.zeros(g, regions, dtype=word_vectors.dtype))  # (G, R)

    @property
    def num_attributes(self) -> int:
        return self.v.shape[0]

    def region_score_map(self) -> Tensor:
        """M1 = V W1 (D_q, C)."""
        if self.region_rank > 0:
            return (self.v @ self.w1a) @ self.w1b
        return self.v @ self.w1

    def full_w1(self) -> Tensor:
        return self.w1a @ self.w1b if self.region_rank > 0 else self.w1  # (G, C)

    def direct(self, f: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """The paper's materialising form on f (B, C, R) -> O_r, O_c | None, A_r."""
        w3 = self.w3 if self.channel_attention else None
        w4 = self.w4 if self.channel_attention else None
        return dan_direct(self.v, self.full_w1(), self.w2, w3, w4, f)


def _stack_and_run(subnets: Sequence[DANSubnet], f: Tensor, channel: bool, return_attention: bool):
    """Run a list of sub-networks as one: stack their maps, multiply the features once.

    f (B, C, R) in float32/64. Returns O_r (B, N), O_c (B, N) | None, A_r (B, N, R) | None,
    rows in the sub-networks' order.
    """
    b, c, r = f.shape
    cdt = compute_dtype(f)
    m1 = [s.region_score_map() for s in subnets]
    m2 = [s.v @ s.w2 for s in subnets]
    m12 = torch.cat(m1 + m2, 0).to(cdt)  # (2N, C): score rows, then attention rows
    fc = f.to(cdt)  # (B, C, R)
    f_cbr = fc.transpose(0, 1).reshape(c, b * r)  # (C, B*R): batch folded into columns
    o_r, a_r = region_branch(m12, f_cbr, b, return_attention)
    o_c = None
    if channel:
        m3 = torch.cat([s.v @ s.w3 for s in subnets], 0).to(cdt)  # (N, R)
        m4 = torch.cat([s.v @ s.w4 for s in subnets], 0).to(cdt)  # (N, R)
        o_c = channel_branch(m3, m4, fc)
    return o_r, o_c, a_r


# ---- the network -----------------------------------------------------------------------
class DEDN(nn.Module):
    """cExp + fExp, each made of DAN sub-networks; see module docstring.

    word_vectors (D, G) are row-L2-normalised here; class_attributes (K, D) are a frozen
    buffer (row-normalised again, defensively); clusters partition range(D).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        word_vectors: Tensor,
        class_attributes: Tensor,
        clusters: Sequence[Sequence[int]],
        feature_shape: tuple[int, int, int] | Sequence[int],
        impl: Impl = "fused",
    ):
        super().__init__()
        word_vectors = torch.as_tensor(word_vectors, dtype=torch.float32)
        class_attributes = torch.as_tensor(class_attributes, dtype=torch.float32)
        if word_vectors.ndim != 2:
            raise ConfigError("word_vectors", "a (D, G) matrix", tuple(word_vectors.shape), "DEDN")
        d, _ = word_vectors.shape
        if class_attributes.ndim != 2 or class_attributes.shape[1] != d:
            raise ConfigError("class_attributes", f"a (K, {d}) matrix", tuple(class_attributes.shape), "DEDN")
        if len(feature_shape) != 3 or min(feature_shape) < 1:
            raise ConfigError("feature_shape", "(C, H, W) positive", tuple(feature_shape), "DEDN")
        if impl not in ("fused", "loop", "direct"):
            raise ConfigError("impl", "one of fused|loop|direct", impl, "DEDN")
        c, h, w = (int(x) for x in feature_shape)
        self.cfg, self.impl = cfg, impl
        self.feature_shape = (c, h, w)
        r = h * w
        v = nn.functional.normalize(word_vectors, dim=1)  # all-zero rows stay zero
        self.register_buffer("class_attributes", nn.functional.normalize(class_attributes, dim=1), persistent=True)

        kw = dict(channel_attention=cfg.channel_attention, region_rank=cfg.region_rank, region_init=cfg.region_init)
        self.coarse = DANSubnet(v, c, r, **kw) if cfg.experts in ("both", "coarse") else None  # type: ignore[arg-type]
        self.fine: nn.ModuleList | None = None
        # model.cluster_layout on the given clusters (idempotent: a saved model's pass unchanged)
        self.clusters = apply_cluster_layout(clusters, cfg.cluster_layout)
        if cfg.experts in ("both", "fine"):
            flat = [a for q in self.clusters for a in q]
            if sorted(flat) != list(range(d)) or any(len(q) == 0 for q in self.clusters):
                raise ConfigError(
                    "clusters", f"non-empty attribute-id lists partitioning range({d})",
                    f"{len(self.clusters)} clusters covering {len(set(flat))} distinct ids of {len(flat)}", "DEDN",
                )
            self.fine = nn.ModuleList([DANSubnet(v[q], c, r, **kw) for q in self.clusters])  # type: ignore[arg-type]
            # fine rows come in cluster order; inverse permutation restores the original order
            self.register_buffer("fine_inverse", torch.argsort(torch.tensor(flat)), persistent=False)

    # -- helpers --
    def _subnets(self) -> list[DANSubnet]:
        return ([self.coarse] if self.coarse is not None else []) + (list(self.fine) if self.fine is not None else [])

    def _expert(self, o_r: Tensor, o_c: Tensor | None, a_r: Tensor | None) -> ExpertOutput:
        a = self.class_attributes
        with torch.autocast(device_type=a.device.type, enabled=False):
            o = o_r if o_c is None else o_r + o_c
            scores = o @ a.to(o.dtype).t()  # (B, K) eq. 11 with the training combination
        return ExpertOutput(o_region=o_r, o_channel=o_c, scores=scores, region_attention=a_r)

    def forward(self, features: Tensor, return_attention: bool = False) -> DEDNOutput:
        """features (B, C, H, W) -> DEDNOutput (attributes in the original order)."""
        if features.ndim != 4 or tuple(features.shape[1:]) != self.feature_shape:
            raise ConfigError("features", f"(B, {', '.join(map(str, self.feature_shape))})", tuple(features.shape), "DEDN.forward")
        f = normalize_features(features, self.cfg.normalize_features)  # (B, C, R)
        if f.dtype not in (torch.float32, torch.float64):
            f = f.float()
        subnets = self._subnets()
        ca = self.cfg.channel_attention
        if self.impl == "fused":
            o_r, o_c, a_r = _stack_and_run(subnets, f, ca, return_attention)
        else:
            outs = [
                s.direct(f) if self.impl == "direct" else _stack_and_run([s], f, ca, return_attention)
                for s in subnets
            ]
            o_r = torch.cat([o[0] for o in outs], 1)
            o_c = torch.cat([o[1] for o in outs], 1) if ca else None
            a_r = torch.cat([o[2] for o in outs], 1) if return_attention else None

        # split the stacked rows back into experts; undo the cluster order for fExp
        d = self.class_attributes.shape[1]
        coarse = fine = None
        start = 0
        if self.coarse is not None:
            coarse = self._expert(
                o_r[:, :d], None if o_c is None else o_c[:, :d], None if a_r is None else a_r[:, :d]
            )
            start = d
        if self.fine is not None:
            inv = self.fine_inverse
            fine = self._expert(
                o_r[:, start:].index_select(1, inv),
                None if o_c is None else o_c[:, start:].index_select(1, inv),
                None if a_r is None else a_r[:, start:].index_select(1, inv),
            )
        return DEDNOutput(coarse=coarse, fine=fine, class_attributes=self.class_attributes)
