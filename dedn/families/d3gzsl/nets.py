"""D3GZSL's networks on the conditional WGAN-GP base of the authors' `gzsl/` integration (f-CLSWGAN-shaped).

Shapes (../shared/docs/d3gzsl.md §3), with F the feature size (2048 for ResNet-101), d_a the
attribute size, K / K_s all / seen classes, hidden 4096 for G and D, E the embedding size (2048):

* Generator G(z, a): [z; a] -> hidden, LeakyReLU(0.2) -> F, ReLU; z ~ N(0, I) of size d_a.
* Critic D(x, a): [x; a] -> hidden, LeakyReLU(0.2) -> 1.
* Teacher: E_T = ReLU(Linear F -> E), C_T: E -> K_s logits (seen classes in sorted id order).
* Student: E_S = ReLU(Linear F -> E), C_S: E -> K logits (global ids), H: log_softmax(l^S) (K) -> 2.
* OODSigmoid: c = sigmoid(w (m + b)) with learnable scalars w = 1, b = 0.

Every Linear starts from N(0, 0.02) with a zero bias, except the student's C_S and H, which keep
PyTorch's default initialisation (as in the authors' code). No normalisation layers, no dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Generator", "Critic", "Teacher", "Student", "OODSigmoid", "init_normal"]


def init_normal(module: nn.Module, std: float = 0.02) -> nn.Module:
    """N(0, std) weights and zero biases for every Linear in `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
    return module


class Generator(nn.Module):
    def __init__(self, att_dim: int, feat_dim: int, hidden: int = 4096, noise_dim: int | None = None):
        super().__init__()
        self.noise_dim = int(noise_dim or att_dim)
        self.fc1 = nn.Linear(self.noise_dim + att_dim, hidden)
        self.fc2 = nn.Linear(hidden, feat_dim)
        init_normal(self)

    def forward(self, att: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Features (n, F) for attribute rows att (n, d_a); fresh noise unless given."""
        if noise is None:
            noise = torch.randn(att.shape[0], self.noise_dim, device=att.device, dtype=att.dtype, generator=generator)
        h = F.leaky_relu(self.fc1(torch.cat([noise, att], dim=1)), 0.2)
        return F.relu(self.fc2(h))


class Critic(nn.Module):
    def __init__(self, att_dim: int, feat_dim: int, hidden: int = 4096):
        super().__init__()
        self.feat_dim = int(feat_dim)
        self.fc1 = nn.Linear(feat_dim + att_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        init_normal(self)

    def forward(self, x: Tensor, att: Tensor, with_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(n,) critic values; with_hidden: also the first layer's pre-activations h (n, hidden)."""
        h = self.fc1(torch.cat([x, att], dim=1))
        out = self.fc2(F.leaky_relu(h, 0.2)).squeeze(1)
        return (out, h) if with_hidden else out

    def feature_gradient(self, h: Tensor) -> Tensor:
        """grad_x D(x, a) (n, F) at the rows whose pre-activations are h, in closed form:
        (w2 * LeakyReLU'(h)) @ W1[:, :F]. The same values as autograd's double backward (LeakyReLU's
        derivative is piecewise constant, so neither has a gradient through it), without the
        input-gradient GEMM over the attribute columns and the other rows of a batched call."""
        slope = torch.full_like(h, 0.2).masked_fill_(h > 0, 1.0)  # in h's dtype (a bare 0.2 would be float32)
        return (slope * self.fc2.weight) @ self.fc1.weight[:, :self.feat_dim]


class Teacher(nn.Module):
    """The seen-class classifier: pretrained on real seen features, then frozen."""

    def __init__(self, feat_dim: int, num_seen: int, emb_dim: int = 2048):
        super().__init__()
        self.embed = nn.Linear(feat_dim, emb_dim)
        self.classify = nn.Linear(emb_dim, num_seen)
        init_normal(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(e^T (n, E), logits (n, K_s))."""
        e = F.relu(self.embed(x))
        return e, self.classify(e)


class Student(nn.Module):
    """The all-class classifier with its 2-way OOD head H."""

    def __init__(self, feat_dim: int, num_classes: int, emb_dim: int = 2048):
        super().__init__()
        self.embed = init_normal(nn.Linear(feat_dim, emb_dim))
        self.classify = nn.Linear(emb_dim, num_classes)  # default init, as the authors'
        self.ood_head = nn.Linear(num_classes, 2)  # default init

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(e^S (n, E), logits l^S (n, K), g = H(log_softmax(l^S)) (n, 2))."""
        e = F.relu(self.embed(x))
        logits = self.classify(e)
        return e, logits, self.ood_head(F.log_softmax(logits, dim=1))


class OODSigmoid(nn.Module):
    """c = sigmoid(w (m + b)): the teacher's log max-softmax probability m as an ID confidence."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, m: Tensor) -> Tensor:
        return torch.sigmoid(self.w * (m + self.b))
