"""D3GZSL's loss terms on tiny shapes: hand-computed values, the explicit pairwise forms, gradient routes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dedn.families.d3gzsl.losses import D3Weights, critic_loss, d3_loss, kl_seen, pairwise_bce_cos
from dedn.families.d3gzsl.nets import Critic, Generator, OODSigmoid, Student, Teacher


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pairwise_term_by_hand():
    # cos(a0, b0) = cos(a0, b1) = 1 -> s = 1; cos(a1, b.) = 0 -> s = 0.5; targets: row 0 same, row 1 not
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    same = torch.tensor([[True, True], [False, False]])
    want = (2 * (softplus(1.0) - 1.0) + 2 * softplus(0.5)) / 4
    assert pairwise_bce_cos(a, b, same).item() == pytest.approx(want, abs=1e-12)


def test_pairwise_term_equals_its_explicit_pairwise_form_and_survives_zero_rows():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    b = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a[3] = 0.0  # an all-zero ReLU row: cos 0, not NaN
    ya, yb = torch.tensor([0, 1, 1, 2, 0, 3, 1]), torch.tensor([1, 0, 2, 2, 3, 1])
    explicit = []
    for i in range(7):
        for j in range(6):
            cos = F.cosine_similarity(a[i:i + 1], b[j:j + 1], eps=1e-8).item()
            s = (1 + cos) / 2
            t = float(ya[i] == yb[j])
            explicit.append(softplus(s) - t * s)  # BCE with logits
    got = pairwise_bce_cos(a, b, ya[:, None] == yb[None, :])
    assert torch.isfinite(got) and got.item() == pytest.approx(sum(explicit) / len(explicit), abs=1e-12)
    # and the same as torch's own BCE-with-logits on the full pair matrix
    s = 0.5 * (1 + F.cosine_similarity(a[:, None, :], b[None, :, :], dim=2, eps=1e-8))
    ref = F.binary_cross_entropy_with_logits(s, (ya[:, None] == yb[None, :]).double())
    assert got.item() == pytest.approx(ref.item(), abs=1e-12)


def test_kl_term_by_hand_in_both_forms():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q_logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # softmax -> (1/4, 3/4)
    method = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_seen(p, q_logits, "method").item() == pytest.approx(method, abs=1e-12)
    # reference: softmax of the probabilities on both sides (the code's double softmax)
    z = math.exp(0.25) + math.exp(0.75)
    q2 = (math.exp(0.25) / z, math.exp(0.75) / z)
    reference = 0.5 * math.log(0.5 / q2[0]) + 0.5 * math.log(0.5 / q2[1])
    assert kl_seen(p, q_logits, "reference").item() == pytest.approx(reference, abs=1e-12)


def _parts(seed: int = 0, n_u: int = 4, b: int = 5, feat: int = 6, att_dim: int = 3, k_s: int = 3, k: int = 5):
    torch.manual_seed(seed)
    gen, teacher, student, sig = Generator(att_dim, feat, hidden=8), Teacher(feat, k_s, 4), Student(feat, k, 4), OODSigmoid()
    teacher.requires_grad_(False)
    att = torch.rand(k, att_dim)
    seen, unseen = torch.arange(k_s), torch.arange(k_s, k)
    y_u = unseen.repeat_interleave(n_u // unseen.numel())
    y_r = torch.randint(0, k_s, (b,))
    real = torch.rand(b, feat)
    return gen, teacher, student, sig, att, seen, y_u, y_r, real


def _d3(gen, teacher, student, sig, att, seen, y_u, y_r, real, weights, form="method"):
    x = torch.cat([gen(att[y_u]), real])
    y = torch.cat([y_u, y_r])
    is_real = torch.cat([torch.zeros(y_u.numel(), dtype=torch.bool), torch.ones(y_r.numel(), dtype=torch.bool)])
    e_s, logits, g = student(x)
    e_t, t_logits = teacher(x)
    return d3_loss(student_emb=e_s, student_logits=logits, ood_repr=g, teacher_emb=e_t, teacher_logits=t_logits,
                   labels=y, real=is_real, seen_ids=seen, sigmoid=sig, weights=weights, form=form)


def test_d3_terms_match_their_definitions():
    gen, teacher, student, sig, att, seen, y_u, y_r, real = _parts()
    with torch.no_grad():
        terms = _d3(gen, teacher, student, sig, att, seen, y_u, y_r, real, D3Weights(1.0, 2.0, 3.0))
    assert terms.total.item() == pytest.approx(
        terms.cls.item() + 2.0 * terms.od.item() + 3.0 * (terms.be.item() + terms.kl.item()), rel=1e-6)
    # L_kl, L_be on the real rows only: recompute them from the real rows alone
    with torch.no_grad():
        e_s, logits, _ = student(real)
        e_t, t_logits = teacher(real)
        kl = kl_seen(F.softmax(t_logits, dim=1), logits[:, seen])
        be = pairwise_bce_cos(e_t, e_s, y_r[:, None] == y_r[None, :])
    assert terms.kl.item() == pytest.approx(kl.item(), rel=1e-6)
    assert terms.be.item() == pytest.approx(be.item(), rel=1e-6)


def test_gradient_routes():
    """The teacher never changes; L_be and L_kl never reach the generator; L_cls and L_od do."""
    gen, teacher, student, sig, att, seen, y_u, y_r, real = _parts(1)
    _d3(gen, teacher, student, sig, att, seen, y_u, y_r, real, D3Weights(cls=0.0, od=0.0, kd=1.0)).total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None or not p.grad.any() for p in gen.parameters())
    assert any(p.grad is not None and p.grad.any() for p in student.parameters())
    assert sig.w.grad is None or sig.w.grad == 0  # L_od is off: the sigmoid gets nothing
    for w in (D3Weights(cls=1.0, od=0.0, kd=0.0), D3Weights(cls=0.0, od=1.0, kd=0.0)):
        gen.zero_grad()
        _d3(gen, teacher, student, sig, att, seen, y_u, y_r, real, w).total.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters()), w
    assert sig.w.grad is not None and sig.w.grad != 0  # L_od trains the sigmoid
    assert all(p.grad is None for p in teacher.parameters())


def test_gradient_penalty_of_a_linear_critic_is_exact():
    # D(x, a) = w.x + v.a + c: its gradient w.r.t. x is w everywhere, so GP = (|w| - 1)^2
    critic = Critic(att_dim=2, feat_dim=3, hidden=1)
    with torch.no_grad():
        critic.fc1.weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 1.0, -1.0]]))  # w = (3, 4, 0), |w| = 5
        critic.fc1.bias.fill_(100.0)  # LeakyReLU stays on its linear side
        critic.fc2.weight.fill_(1.0)
    real, fake, att = torch.rand(4, 3), torch.rand(4, 3), torch.rand(4, 2)
    loss, parts = critic_loss(critic, real, fake, att, gp_weight=1.0)
    assert parts["gp"].item() == pytest.approx(16.0, rel=1e-6)
    # the Wasserstein part of a linear critic: w.(mean real - mean fake)
    w = torch.tensor([3.0, 4.0, 0.0])
    assert parts["wasserstein"].item() == pytest.approx(((real - fake) @ w).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(16.0 - parts["wasserstein"].item(), rel=1e-5)


def test_closed_form_penalty_equals_autograds_double_backward():
    """Critic.feature_gradient against torch.autograd.grad(create_graph=True), values and the gradient the
    penalty sends to D's parameters (float64)."""
    torch.manual_seed(0)
    critic = Critic(att_dim=3, feat_dim=5, hidden=7).double()
    for p in critic.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    x, att = torch.rand(6, 5, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)

    def penalty(closed: bool):
        critic.zero_grad()
        xx = x.clone().requires_grad_(not closed)
        out, h = critic(xx, att, with_hidden=True)
        grad = critic.feature_gradient(h) if closed else torch.autograd.grad(out.sum(), xx, create_graph=True)[0]
        gp = ((grad.norm(dim=1) - 1.0) ** 2).mean()
        gp.backward()
        return grad.detach(), gp.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                            for p in critic.parameters()]

    g1, gp1, grads1 = penalty(True)
    g2, gp2, grads2 = penalty(False)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gp1, gp2, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_critic_step_gives_the_generator_no_gradient():
    torch.manual_seed(0)
    gen, critic = Generator(3, 6, hidden=8), Critic(3, 6, hidden=8)
    att = torch.rand(5, 3)
    loss, logs = critic_loss(critic, torch.rand(5, 6), gen(att), att)
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None for p in critic.parameters())
    assert set(logs) == {"wasserstein", "gp"}


def _nets(seed: int = 0):
    from dedn.families.d3gzsl.step import D3Nets

    torch.manual_seed(seed)
    feat, att_dim, k_s, k = 6, 3, 3, 5
    teacher = Teacher(feat, k_s, 4).requires_grad_(False)
    nets = D3Nets(Generator(att_dim, feat, hidden=8), Critic(att_dim, feat, hidden=8), teacher, Student(feat, k, 4),
                  OODSigmoid(), torch.rand(k, att_dim), torch.arange(k_s), torch.arange(k_s, k))
    opts = {name: torch.optim.Adam(getattr(nets, name).parameters(), lr=1e-2, betas=(0.5, 0.999))
            for name in ("generator", "critic", "student", "sigmoid")}
    return nets, opts


def _snapshot(nets) -> dict[str, list[torch.Tensor]]:
    return {n: [p.detach().clone() for p in getattr(nets, n).parameters()]
            for n in ("generator", "critic", "teacher", "student", "sigmoid")}


def _changed(before, nets) -> set[str]:
    return {n for n, ps in before.items()
            if any(not torch.equal(a, b) for a, b in zip(ps, getattr(nets, n).parameters()))}


@pytest.mark.parametrize("enabled", [True, False])
def test_update_order_steps_the_right_networks(enabled):
    """A critic step moves D (and, with D3, the student and the sigmoid), never G or the teacher; the
    generator step moves G (and the student and sigmoid), never D or the teacher."""
    from dedn.families.d3gzsl.losses import D3Weights
    from dedn.families.d3gzsl.step import StepConfig, critic_step, generator_step

    nets, opts = _nets()
    cfg = StepConfig(weights=D3Weights(1.0, 1.0, 1.0), enabled=enabled, syn_per_unseen=2)
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 1])
    before = _snapshot(nets)
    parts = critic_step(nets, opts, x, y, cfg)
    d3 = {"student", "sigmoid"} if enabled else set()
    assert _changed(before, nets) == {"critic"} | d3
    assert ("d3" in parts) == enabled and math.isfinite(parts["critic"])
    before = _snapshot(nets)
    generator_step(nets, opts, x, y, cfg)
    assert _changed(before, nets) == {"generator"} | d3


def test_scaler_is_fitted_on_train_only_and_reapplied():
    from dedn.families.d3gzsl.classifier import FeatureScaler

    train = torch.tensor([[0.0, 5.0, 1.0], [2.0, 7.0, 1.0]])
    sc = FeatureScaler(3).fit(train)
    assert torch.allclose(sc(train), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    test = torch.tensor([[4.0, 6.0, 3.0]])  # outside the training range: not clipped (the authors' behaviour)
    assert torch.allclose(sc(test), torch.tensor([[2.0, 0.5, 2.0]]))
    again = FeatureScaler(3)
    again.load_state_dict(sc.state_dict())  # saved with the model, applied again at prediction
    assert torch.equal(again(test), sc(test))


def test_synthesis_is_seeded_and_the_final_classifier_learns_generated_classes():
    from dedn.families.d3gzsl.classifier import fit_final_classifier, synthesize

    torch.manual_seed(0)
    gen = Generator(att_dim=4, feat_dim=8, hidden=16)
    att = torch.eye(4) * 3
    ids = torch.tensor([2, 3])
    a, ya = synthesize(gen, att, ids, 5, seed=7)
    b, _ = synthesize(gen, att, ids, 5, seed=7)
    c, _ = synthesize(gen, att, ids, 5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c) and ya.tolist() == [2] * 5 + [3] * 5
    # four well-separated classes: 0 and 1 real, 2 and 3 only as (stand-in) synthetic rows
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 8) * 4
    y = torch.arange(4).repeat_interleave(30)
    x = centers[y] + 0.3 * torch.randn(120, 8, generator=g)
    clf = fit_final_classifier(x, y, 4, epochs=30, batch_size=32, lr=1e-2, seed=0)
    acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
    clf2 = fit_final_classifier(x, y, 4, epochs=30, batch_size=32, lr=1e-2, seed=0)
    assert torch.equal(clf.weight, clf2.weight)  # seeded: the same classifier again
