"""The D3GZSL network as one module: the conditional WGAN-GP (G, D), the frozen teacher, the student
with its OOD head, the learnable sigmoid, the train-fitted feature scaler and the final classifier.

Features: a row's feature map (C, H, W) is mean-pooled to C (ResNet-101's global average pool; a
pooled xlsa17 dataset has 1 x 1 maps) and min-max scaled by the scaler fitted on the training
split. In training mode `forward` returns those scaled features (the family's train step feeds them
to the networks); in eval mode it returns the two class scores GZSL inference combines: the log
softmax of the final classifier and of the student (`D3Output`).

The final classifier (Linear to K classes) is fitted before every evaluation, on real training
features plus generated features of the unseen classes (`dedn.families.d3gzsl.FAMILY.before_eval`),
in the student's embedding space E_S (the authors' `gzsl/` with dependent_test=False) or on the
scaled features themselves (`classifier_space`). A bank of up to `bank_per_class` real rows per
seen class is kept with the model so that new classes can be added at prediction time by
generating their features and refitting the classifier (`with_classes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.families.d3gzsl.classifier import FeatureScaler
from dedn.families.d3gzsl.config import D3ModelConfig
from dedn.families.d3gzsl.nets import Critic, Generator, OODSigmoid, Student, Teacher

__all__ = ["D3GZSL", "D3Output"]


@dataclass
class D3Output:
    """Eval-mode output: log-probabilities (B, K) of the final classifier and of the student."""

    final: Tensor
    student: Tensor


class D3GZSL(nn.Module):
    def __init__(self, cfg: D3ModelConfig, *, class_attributes: Tensor, feature_shape: Sequence[int],
                 seen: Sequence[int], unseen: Sequence[int], classifier_space: str = "student",
                 bank_per_class: int = 32):
        super().__init__()
        a = torch.as_tensor(class_attributes, dtype=torch.float32)
        k, d_a = a.shape
        c = int(feature_shape[0])
        self.feature_shape = tuple(int(s) for s in feature_shape)
        if classifier_space not in ("student", "features"):
            raise ValueError(f"classifier_space: expected student|features, found {classifier_space!r}")
        self.classifier_space = classifier_space
        self.register_buffer("class_attributes", a)  # (K, d_a), row-L2-normalised (xlsa17 att)
        self.register_buffer("seen_ids", torch.as_tensor(sorted(seen), dtype=torch.long))
        self.register_buffer("unseen_ids", torch.as_tensor(sorted(unseen), dtype=torch.long))
        ks = len(seen)
        self.bank_per_class = int(bank_per_class)
        self.register_buffer("bank_x", torch.zeros(ks * self.bank_per_class, c, dtype=torch.float16))
        self.register_buffer("bank_y", torch.full((ks * self.bank_per_class,), -1, dtype=torch.long))  # -1: empty
        self.scaler = FeatureScaler(c)
        self.generator = Generator(d_a, c, cfg.hidden, cfg.noise_dim or None)
        self.critic = Critic(d_a, c, cfg.hidden)
        self.teacher = Teacher(c, ks, cfg.embed_dim).requires_grad_(False)
        self.student = Student(c, k, cfg.embed_dim)
        self.sigmoid = OODSigmoid()
        self.classifier = nn.Linear(cfg.embed_dim if classifier_space == "student" else c, k)
        self.classifier.requires_grad_(False)  # fitted by fit_final_classifier, never by the training step

    @property
    def num_classes(self) -> int:
        return int(self.classifier.out_features)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) maps -> (B, C) pooled, scaled, float32."""
        return self.scaler(x.float().mean(dim=(2, 3)))

    def classifier_input(self, f: Tensor) -> Tensor:
        """The space the final classifier works in: E_S(f) or f itself."""
        return self.student(f)[0] if self.classifier_space == "student" else f

    def forward(self, x: Tensor) -> Tensor | D3Output:
        f = self.features(x)
        if self.training:
            return f
        final = F.log_softmax(self.classifier(self.classifier_input(f)), dim=1)
        student = F.log_softmax(self.student(f)[1], dim=1)
        if student.shape[1] < final.shape[1]:  # new classes: the student has no column, they take the final score
            student = torch.cat([student, final[:, student.shape[1]:]], dim=1)
        return D3Output(final, student)
