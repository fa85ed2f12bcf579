"""The generative side of D3GZSL's GZSL evaluation: feature scaling, synthetic features, the final classifier.

* `FeatureScaler`: per-dimension min-max scaling fitted on the training split only (the authors fit
  sklearn's MinMaxScaler on trainval); saved with the model as buffers and applied again at
  prediction, so test values may leave [0, 1].
* `synthesize`: n features per class from the generator, seeded, without gradient.
* `fit_final_classifier`: the softmax classifier over all K classes trained on real seen features
  plus synthetic features of the classes that have no real ones (../shared/docs/d3gzsl.md §6,
  `dependent_test=False`); new classes at inference are added the same way (generate, refit),
  without touching the generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.seeds import seeded

__all__ = ["FeatureScaler", "synthesize", "fit_final_classifier"]


class FeatureScaler(nn.Module):
    """x -> (x - min) / (max - min) per dimension, min and max from the training split; constant dims map to 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("low", torch.zeros(dim))
        self.register_buffer("span", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: Tensor) -> "FeatureScaler":
        low, high = x.min(dim=0).values, x.max(dim=0).values
        span = high - low
        self.low.copy_(low)
        self.span.copy_(torch.where(span > 0, span, torch.ones_like(span)))
        return self

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.low) / self.span


@torch.no_grad()
def synthesize(generator: nn.Module, class_attributes: Tensor, class_ids: Tensor, per_class: int,
               seed: int) -> tuple[Tensor, Tensor]:
    """(features (len(class_ids) * per_class, F), labels) from fresh noise drawn by a generator seeded with `seed`."""
    g = torch.Generator(device=class_attributes.device).manual_seed(int(seed))
    labels = class_ids.repeat_interleave(per_class)
    return generator(class_attributes[labels], generator=g), labels


def fit_final_classifier(x: Tensor, y: Tensor, num_classes: int, *, epochs: int = 20, batch_size: int = 256,
                         lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.999), seed: int = 0) -> nn.Linear:
    """A Linear(F -> K) trained with cross-entropy (log-softmax + NLL) by Adam on (x, y), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    with seeded(seed):
        clf = nn.Linear(x.shape[1], num_classes).to(x.device, x.dtype)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, betas=betas)
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(clf(x[idx]), y[idx]).backward()
            opt.step()
    return clf.eval().requires_grad_(False)
