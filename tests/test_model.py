"""DEDN model: fused == per-cluster loop == paper form, switches, shapes, dtypes."""
from __future__ import annotations

import pytest
import torch

from dedn.families.dedn.config import DEDNModelConfig as ModelConfig
from dedn.errors import ConfigError
from dedn.families.dedn.model import DEDN, DEDNOutput, combine_score_parts

B, C, H, W, D, G, K = 2, 5, 2, 2, 7, 4, 5
CLUSTERS = [[0, 3, 5], [1, 6], [2, 4]]  # Q = 3, deliberately not contiguous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _make(impl="fused", hw=(H, W), seed=1, **cfg) -> DEDN:
    torch.manual_seed(seed)
    v, a = torch.randn(D, G), torch.rand(K, D)
    m = DEDN(ModelConfig(**cfg), word_vectors=v, class_attributes=a, clusters=CLUSTERS, feature_shape=(C, *hw), impl=impl)
    m = m.double()
    with torch.no_grad():  # non-trivial attention (W2, W4 start at zero)
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return m


def _run(m: DEDN, x: torch.Tensor):
    out = m(x, return_attention=True)
    parts = out.score_parts()
    loss = sum((p * (i + 1)).sin().sum() for i, p in enumerate(parts.values()))
    loss = loss + sum(e.scores.cos().sum() for e in (out.coarse, out.fine) if e is not None)
    m.zero_grad()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


# docs/performance.md#the-fused-form
@pytest.mark.parametrize("hw", [(2, 2), (1, 1), (3, 3)])
@pytest.mark.parametrize("channel_attention", [True, False])
def test_fused_equals_loop_and_direct(hw, channel_attention):
    x = torch.randn(B, C, *hw, dtype=torch.float64)
    res = {impl: _run(_make(impl, hw, channel_attention=channel_attention), x) for impl in ("fused", "loop", "direct")}
    out, grads = res["fused"]
    for impl in ("loop", "direct"):
        o2, g2 = res[impl]
        for ex, ex2 in ((out.coarse, o2.coarse), (out.fine, o2.fine)):
            torch.testing.assert_close(ex.o_region, ex2.o_region, rtol=0, atol=1e-10)
            torch.testing.assert_close(ex.scores, ex2.scores, rtol=0, atol=1e-10)
            torch.testing.assert_close(ex.region_attention, ex2.region_attention, rtol=0, atol=1e-10)
            if channel_attention:
                torch.testing.assert_close(ex.o_channel, ex2.o_channel, rtol=0, atol=1e-10)
            else:
                assert ex.o_channel is None and ex2.o_channel is None
        assert grads.keys() == g2.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, g2[n], rtol=0, atol=1e-10, msg=f"{impl} grad {n}")
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        if not (hw == (1, 1) and n.endswith(".w2")):  # a softmax over one region is constant
            assert g.abs().sum() > 0, n


# docs/method.md#coarse-and-fine-experts
def test_fine_expert_matches_independent_subnetworks_in_original_order():
    m = _make()
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    out = m(x)
    f = torch.nn.functional.normalize(x.flatten(2), dim=1)
    a = m.class_attributes
    o_r = torch.zeros(B, D, dtype=x.dtype)
    o_c = torch.zeros(B, D, dtype=x.dtype)
    for q, sub in zip(CLUSTERS, m.fine):
        r, c, _ = sub.direct(f)
        o_r[:, q], o_c[:, q] = r, c
    torch.testing.assert_close(out.fine.o_region, o_r, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.fine.scores, (o_r + o_c) @ a.t(), rtol=0, atol=1e-12)
    r, c, _ = m.coarse.direct(f)
    torch.testing.assert_close(out.coarse.o_channel, c, rtol=0, atol=1e-12)


# docs/method.md#inputs-and-normalisation, docs/method.md#region-attention (uniform start)
def test_init_state_inputs_normalised_and_uniform_attention():
    v, a = torch.randn(D, G) * 3, torch.rand(K, D) * 5
    m = DEDN(ModelConfig(), word_vectors=v, class_attributes=a, clusters=CLUSTERS, feature_shape=(C, H, W))
    torch.testing.assert_close(m.coarse.v.norm(dim=1), torch.ones(D))
    torch.testing.assert_close(m.fine[1].v, torch.nn.functional.normalize(v, dim=1)[[1, 6]])
    torch.testing.assert_close(m.class_attributes.norm(dim=1), torch.ones(K))
    assert "class_attributes" in dict(m.named_buffers()) and not any(p is m.class_attributes for p in m.parameters())
    assert m.coarse.w2.abs().sum() == 0 and m.coarse.w4.abs().sum() == 0
    assert m.coarse.w1.shape == (G, C) and m.coarse.w3.shape == (G, H * W) and m.fine[0].v.shape == (3, G)
    out = m(torch.randn(B, C, H, W), return_attention=True)
    torch.testing.assert_close(out.fine.region_attention, torch.full((B, D, H * W), 1 / (H * W)))


# docs/method.md#region-attention
def test_attention_maps_sum_to_one_and_shapes():
    m = _make(hw=(3, 3))
    out = m(torch.randn(B, C, 3, 3, dtype=torch.float64), return_attention=True)
    for ex in (out.coarse, out.fine):
        assert ex.region_attention.shape == (B, D, 9)
        torch.testing.assert_close(ex.region_attention.sum(-1), torch.ones(B, D, dtype=torch.float64))
        assert ex.scores.shape == (B, K) and ex.o_region.shape == (B, D)
    assert m(torch.randn(B, C, 3, 3, dtype=torch.float64)).coarse.region_attention is None


# docs/method.md#inference (and #combining-region-and-channel, #class-scores)
def test_inference_scores_and_parts():
    m = _make()
    out = m(torch.randn(B, C, H, W, dtype=torch.float64))
    parts = out.score_parts()
    assert set(parts) == {"P_rc", "P_cc", "P_rf", "P_cf"}
    a = m.class_attributes
    lrc, le = 0.8, 0.3
    oc = lrc * out.coarse.o_region + (1 - lrc) * out.coarse.o_channel  # eq. 8
    of = lrc * out.fine.o_region + (1 - lrc) * out.fine.o_channel
    expected = le * oc @ a.t() + (1 - le) * of @ a.t()  # eq. 19
    torch.testing.assert_close(out.inference_scores(lrc, le), expected, rtol=0, atol=1e-12)
    # the training combination is the unweighted sum of the parts
    torch.testing.assert_close(out.coarse.scores, parts["P_rc"] + parts["P_cc"], rtol=0, atol=1e-12)
    # any leading shape (a grid of lambdas at once)
    stacked = {k: v[None] for k, v in parts.items()}
    assert combine_score_parts(stacked, lrc, le).shape == (1, B, K)


# docs/method.md#coarse-and-fine-experts
def test_ablation_switches_change_exactly_their_part():
    full = _make()
    names = {n for n, _ in full.named_parameters()}
    assert any(n.startswith("fine.") for n in names) and any(".w3" in n for n in names)

    no_ca = _make(channel_attention=False)
    n2 = {n for n, _ in no_ca.named_parameters()}
    assert not any(".w3" in n or ".w4" in n for n in n2)
    assert n2 == {n for n in names if ".w3" not in n and ".w4" not in n}
    out = no_ca(torch.randn(B, C, H, W, dtype=torch.float64))
    assert set(out.score_parts()) == {"P_rc", "P_rf"}
    torch.testing.assert_close(out.inference_scores(0.1, 0.5), out.inference_scores(0.9, 0.5))  # lambda_rc irrelevant
    torch.testing.assert_close(out.coarse.scores, out.score_parts()["P_rc"])

    coarse = _make(experts="coarse")
    assert not any(n.startswith("fine") for n, _ in coarse.named_parameters()) and coarse.fine is None
    out = coarse(torch.randn(B, C, H, W, dtype=torch.float64))
    assert out.fine is None and set(out.score_parts()) == {"P_rc", "P_cc"}
    torch.testing.assert_close(out.inference_scores(0.8, 0.2), out.inference_scores(0.8, 0.9))  # lambda_e irrelevant

    fine = _make(experts="fine")
    assert fine.coarse is None and not any(n.startswith("coarse") for n, _ in fine.named_parameters())
    out = fine(torch.randn(B, C, H, W, dtype=torch.float64))
    assert out.coarse is None and set(out.score_parts()) == {"P_rf", "P_cf"}


# docs/reference-variant.md#sun-the-authors-cluster-slip-and-low-rank-initialisation
def test_region_rank_low_rank_path():
    m = _make(region_rank=2)
    names = {n for n, _ in m.named_parameters()}
    assert "coarse.w1a" in names and "coarse.w1b" in names and "coarse.w1" not in names
    assert m.coarse.w1a.shape == (G, 2) and m.coarse.w1b.shape == (2, C)
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    res = {impl: _run(_make(impl, region_rank=2), x) for impl in ("fused", "direct")}
    torch.testing.assert_close(res["fused"][0].fine.scores, res["direct"][0].fine.scores, rtol=0, atol=1e-10)
    for n, g in res["fused"][1].items():
        torch.testing.assert_close(g, res["direct"][1][n], rtol=0, atol=1e-10)


# docs/performance.md#precision-bf16
def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(3)
    c, d = 64, 20
    v, a = torch.randn(d, 16), torch.rand(6, d)
    m = DEDN(ModelConfig(), word_vectors=v, class_attributes=a, clusters=[list(range(8)), list(range(8, d))], feature_shape=(c, 3, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(4, c, 3, 3)
    ref = m(x).inference_scores(0.8, 0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        s = out.inference_scores(0.8, 0.9)
        (out.coarse.scores.sum() + out.fine.scores.sum()).backward()
    assert s.dtype == torch.float32
    assert (s - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_bad_inputs_raise_config_error():
    v, a = torch.randn(D, G), torch.rand(K, D)
    with pytest.raises(ConfigError, match="clusters"):
        DEDN(ModelConfig(), word_vectors=v, class_attributes=a, clusters=[[0, 1], [2]], feature_shape=(C, H, W))
    with pytest.raises(ConfigError, match="class_attributes"):
        DEDN(ModelConfig(), word_vectors=v, class_attributes=a[:, :3], clusters=CLUSTERS, feature_shape=(C, H, W))
    m = DEDN(ModelConfig(), word_vectors=v, class_attributes=a, clusters=CLUSTERS, feature_shape=(C, H, W))
    with pytest.raises(ConfigError, match="features"):
        m(torch.randn(B, C, 3, 3))
    assert isinstance(m(torch.randn(B, C, H, W)), DEDNOutput)
