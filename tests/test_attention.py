"""DAN kernels (dedn.nn.attention) against plain per-sample, per-attribute loops."""
from __future__ import annotations

import math

import pytest
import torch

from dedn.nn.attention import channel_branch, channel_branch_sdpa, dan_direct, normalize_features, region_branch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _loops(v, w1, w2, w3, w4, f):
    """Eqs. 1-6 with explicit loops over samples, attributes, regions and channels."""
    b, c, r = f.shape
    d = v.shape[0]
    m1, m2, m3, m4 = v @ w1, v @ w2, v @ w3, v @ w4
    o_r = torch.zeros(b, d, dtype=f.dtype)
    o_c = torch.zeros(b, d, dtype=f.dtype)
    for n in range(b):
        for i in range(d):
            s_r = [sum(m1[i, k] * f[n, k, j] for k in range(c)) for j in range(r)]
            l_r = [sum(m2[i, k] * f[n, k, j] for k in range(c)) for j in range(r)]
            z = sum(math.exp(x) for x in l_r)
            o_r[n, i] = sum(s_r[j] * math.exp(l_r[j]) / z for j in range(r))
            s_c = [sum(m3[i, j] * f[n, k, j] for j in range(r)) for k in range(c)]
            l_c = [sum(m4[i, j] * f[n, k, j] for j in range(r)) for k in range(c)]
            z = sum(math.exp(x) for x in l_c)
            o_c[n, i] = sum(s_c[k] * math.exp(l_c[k]) / z for k in range(c))
    return o_r, o_c


def _params(d=3, g=4, c=5, r=4, b=2, dtype=torch.float64):
    v = torch.randn(d, g, dtype=dtype)
    w = [torch.randn(g, c, dtype=dtype), torch.randn(g, c, dtype=dtype) * 0.5]
    w += [torch.randn(g, r, dtype=dtype), torch.randn(g, r, dtype=dtype) * 0.5]
    f = torch.randn(b, c, r, dtype=dtype)
    return v, w, f


# docs/method.md#region-attention, docs/method.md#channel-attention
def test_direct_matches_loops():
    v, (w1, w2, w3, w4), f = _params()
    o_r, o_c, a_r = dan_direct(v, w1, w2, w3, w4, f)
    e_r, e_c = _loops(v, w1, w2, w3, w4, f)
    torch.testing.assert_close(o_r, e_r, rtol=0, atol=1e-12)
    torch.testing.assert_close(o_c, e_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(a_r.sum(-1), torch.ones(2, 3, dtype=f.dtype))


# docs/performance.md#channel-branch-without-dxc-tensors
@pytest.mark.parametrize("r", [1, 4, 9])
def test_fast_branches_match_direct_values_and_grads(r):
    v, ws, f = _params(r=r)
    ws = [w.requires_grad_() for w in ws]
    w1, w2, w3, w4 = ws
    b, c, _ = f.shape
    o_r, o_c, a_r = dan_direct(v, w1, w2, w3, w4, f)
    g_ref = torch.autograd.grad((o_r.sin().sum() + o_c.cos().sum()), ws)

    m12 = torch.cat([v @ w1, v @ w2])
    f_cbr = f.transpose(0, 1).reshape(c, b * r)
    fo_r, fa_r = region_branch(m12, f_cbr, b, return_attention=True)
    fo_c = channel_branch(v @ w3, v @ w4, f)
    g = torch.autograd.grad((fo_r.sin().sum() + fo_c.cos().sum()), ws)
    torch.testing.assert_close(fo_r, o_r, rtol=0, atol=1e-10)
    torch.testing.assert_close(fo_c, o_c, rtol=0, atol=1e-10)
    torch.testing.assert_close(fa_r, a_r, rtol=0, atol=1e-12)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)


# docs/performance.md#channel-branch-without-dxc-tensors
def test_channel_kernel_feature_gradient_and_sdpa_agree():
    v, (_, _, w3, w4), f = _params()
    m3, m4 = (v @ w3).requires_grad_(), (v @ w4).requires_grad_()
    f = f.clone().requires_grad_()
    ref = (torch.softmax(m4 @ f.transpose(1, 2), -1) * (m3 @ f.transpose(1, 2))).sum(-1)  # (B, N)
    g_ref = torch.autograd.grad(ref.sin().sum(), (m3, m4, f))
    out = channel_branch(m3, m4, f)
    g = torch.autograd.grad(out.sin().sum(), (m3, m4, f))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, e in zip(g, g_ref):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
    torch.testing.assert_close(channel_branch_sdpa(m3, m4, f), ref, rtol=0, atol=1e-10)


# docs/method.md#inputs-and-normalisation
def test_normalize_features_unit_norm_per_region():
    x = torch.randn(2, 5, 3, 3)
    f = normalize_features(x)
    assert f.shape == (2, 5, 9)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 9))
    torch.testing.assert_close(normalize_features(x, False), x.flatten(2))
