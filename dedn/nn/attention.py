"""Dual Attention Network (DAN) math, Rao et al., IJCAI 2024, Sec. 3.3, eqs. 1-6.

Pure functions on *stacked* projection matrices, so that any number of DAN sub-networks
(cExp, every fExp cluster) run as one product against the features:

    M1 = V W1, M2 = V W2  (N, C)      region score / attention maps over the R regions
    M3 = V W3, M4 = V W4  (N, R)      channel score / attention maps over the C channels

with N the stacked attribute rows of all sub-networks and F (B, C, R) the features.

Region branch (eqs. 1-3):  O_r[i] = sum_r softmax_r(M2 F)[i, r] * (M1 F)[i, r]
Channel branch (eqs. 4-6): O_c[i] = sum_c softmax_c(M4 F^T)[i, c] * (M3 F^T)[i, c]
                                  = sum_r M3[i, r] * (softmax(M4 F^T) F)[i, r]

The second form of the channel branch (docs/performance.md#channel-branch-without-dxc-tensors)
is exact: the bracket is
attention with queries M4, keys = values = the C channel rows of F, scale 1. It never forms
S_c = M3 F^T, and its (N, C) attention matrix lives one batch chunk at a time
(`ChannelAttention` recomputes it per sample in the backward pass instead of storing
B x N x C).

`dan_direct` is the paper's form, materialising every map, used by tests and by the
benchmark's "authors' form" baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F_

__all__ = [
    "normalize_features",
    "region_branch",
    "channel_branch",
    "channel_branch_sdpa",
    "dan_direct",
    "compute_dtype",
]

def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """dtype the big products run in: the autocast dtype when autocast is on for t's device."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev) and t.dtype == torch.float32:
        return torch.get_autocast_dtype(dev)
    return t.dtype


def normalize_features(features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, R); L2-normalised over channels per region when `normalize`."""
    f = features.flatten(2)  # (B, C, R)
    if normalize:
        f = F_.normalize(f, p=2.0, dim=1)  # reference code: each region's C-vector has unit norm
    return f


def region_branch(
    m12: torch.Tensor, f_cbr: torch.Tensor, batch: int, return_attention: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eqs. 1-3 for N stacked attribute rows.

    m12: (2N, C) = [M1; M2] (score rows, then attention rows), in the compute dtype.
    f_cbr: (C, B*R) the features with the batch folded into the columns, so that the forward
        is ONE GEMM and the weight gradient dM12 = dZ F^T is one GEMM too.
    Returns O_r (B, N) in float32 (or float64) and, if asked, A_r (B, N, R).
    """
    n = m12.shape[0] // 2
    r = f_cbr.shape[1] // batch
    z = torch.matmul(m12, f_cbr).view(2 * n, batch, r)  # (2N, B, R)
    acc = torch.promote_types(z.dtype, torch.float32)  # softmax and sums in >= fp32
    s = z[:n].to(acc)  # (N, B, R) S_r
    a = torch.softmax(z[n:].to(acc), dim=-1)  # (N, B, R) A_r, softmax over regions
    o = (a * s).sum(-1).t()  # (B, N)
    return o, (a.permute(1, 0, 2) if return_attention else None)


class ChannelAttention(torch.autograd.Function):
    """O_c[b, i] = sum_r M3[i, r] * (softmax(M4 F_b^T) F_b)[i, r], one sample at a time.

    Forward keeps only Y = softmax(M4 F^T) F (B, N, R); backward recomputes each sample's
    (N, C) attention while it is in cache instead of storing B x N x C. Per-sample blocks
    also keep every temporary small enough to be reused by the allocator (fresh large
    blocks cost page faults on CPU). No gradient for F unless it requires one.
    Large products run in the inputs' dtype; sums over R and the gradient of M4 in >= fp32.
    """

    @staticmethod
    def forward(ctx, m3: torch.Tensor, m4: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b = f.shape[0]
        acc = torch.promote_types(f.dtype, torch.float32)
        y = torch.empty(b, m4.shape[0], f.shape[2], dtype=f.dtype, device=f.device)  # (B, N, R)
        for i in range(b):
            fi = f[i]  # (C, R)
            p = torch.softmax(m4 @ fi.t(), dim=-1)  # (N, C) attention over channels
            torch.mm(p, fi, out=y[i])  # (N, R)
        ctx.save_for_backward(m3, m4, f, y)
        return torch.einsum("bnr,nr->bn", y.to(acc), m3.to(acc))  # (B, N)

    @staticmethod
    def backward(ctx, go: torch.Tensor):  # type: ignore[override]
        m3, m4, f, y = ctx.saved_tensors
        need_m3, need_m4, need_f = ctx.needs_input_grad[:3]
        acc = torch.promote_types(f.dtype, torch.float32)
        go = go.to(acc)  # (B, N)
        ya = y.to(acc)  # (B, N, R)
        gm3 = torch.einsum("bn,bnr->nr", go, ya).to(m3.dtype) if need_m3 else None
        gm4 = torch.zeros(m4.shape, dtype=acc, device=m4.device) if need_m4 else None
        gf = torch.empty_like(f) if need_f else None
        if need_m4 or need_f:
            dy_all = go[:, :, None] * m3.to(acc)  # (B, N, R) dO/dY
            rowdot = (dy_all * ya).sum(-1, keepdim=True).to(f.dtype)  # (B, N, 1) = sum_c P dP
            dy_all = dy_all.to(f.dtype)
            for i in range(f.shape[0]):
                fi, dy = f[i], dy_all[i]  # (C, R), (N, R)
                p = torch.softmax(m4 @ fi.t(), dim=-1)  # (N, C) recomputed
                ds = (dy @ fi.t()).sub_(rowdot[i]).mul_(p)  # (N, C) softmax backward
                if need_m4:
                    gm4 += ds @ fi  # (N, R)
                if need_f:  # F is both key and value
                    gf[i] = p.t() @ dy + ds.t() @ m4  # (C, R)
        return gm3, (gm4.to(m4.dtype) if gm4 is not None else None), gf


def channel_branch(m3: torch.Tensor, m4: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Eqs. 4-6 for N stacked attribute rows: m3, m4 (N, R), f (B, C, R) -> O_c (B, N) in >= fp32.

    All three in the same compute dtype. On CUDA the fused attention kernels of
    `scaled_dot_product_attention` never build the (N, C) matrix either and beat a per-sample
    loop of small launches; on CPU the custom kernel below is faster (it skips dF).
    """
    dev = f.device.type
    if dev == "cuda":
        return channel_branch_sdpa(m3, m4, f)
    # The kernel picks its own precisions; autocast must not recast inside it.
    with torch.autocast(device_type=dev, enabled=False):
        return ChannelAttention.apply(m3, m4, f)


def channel_branch_sdpa(m3: torch.Tensor, m4: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Same as `channel_branch`, through torch's scaled_dot_product_attention (for comparison).

    Its backward also computes gradients for keys and values; F needs none, so the custom
    kernel above does less work.
    """
    # 4-D (batch, heads = 1, sequence, R): torch's fused CUDA kernels (flash, memory-efficient) take
    # only 4-D inputs; 3-D ones fall back to the math kernel, which builds the (B, N, C) matrix twice.
    q = m4.unsqueeze(0).expand(f.shape[0], -1, -1).unsqueeze(1)  # (B, 1, N, R) queries
    kv = f.unsqueeze(1)  # (B, 1, C, R) keys = values = the C channel rows
    y = F_.scaled_dot_product_attention(q, kv, kv, scale=1.0).squeeze(1)  # (B, N, R)
    acc = torch.promote_types(y.dtype, torch.float32)
    return (y.to(acc) * m3.to(acc)).sum(-1)  # (B, N)


def dan_direct(
    v: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor | None,
    w4: torch.Tensor | None,
    f: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One DAN sub-network exactly as the paper writes it (eqs. 1-6), materialising S and A.

    v (D, G), w1 w2 (G, C), w3 w4 (G, R) or None (no channel attention), f (B, C, R).
    Returns O_r (B, D), O_c (B, D) or None, A_r (B, D, R).
    """
    s_r = v @ w1 @ f  # (B, D, R) eq. 1
    a_r = torch.softmax(v @ w2 @ f, dim=-1)  # (B, D, R) eq. 2, over regions
    o_r = (s_r * a_r).sum(-1)  # (B, D) eq. 3
    o_c = None
    if w3 is not None and w4 is not None:
        ft = f.transpose(1, 2)  # (B, R, C)
        s_c = v @ w3 @ ft  # (B, D, C) eq. 4
        a_c = torch.softmax(v @ w4 @ ft, dim=-1)  # (B, D, C) eq. 5, over channels
        o_c = (s_c * a_c).sum(-1)  # (B, D) eq. 6
    return o_r, o_c, a_r
