"""D3GZSL's config blocks: `model` (network sizes), `loss` (alias `d3.`: the D3 objective, the WGAN-GP
base, the teacher's pretraining and the learning-rate schedule) and `eval` (the final classifier; the
family adds the post-hoc weight between it and the student). Facts: ../shared/docs/d3gzsl.md; what
each default changes relative to the authors' code: docs/d3gzsl.md."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dedn.config_sections import EvalConfig, check

__all__ = ["D3ModelConfig", "D3LossConfig", "D3EvalConfig"]


def _nonneg(key: str, v: float) -> None:
    check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, key, "a finite number >= 0", v)


@dataclass(frozen=True)
class D3ModelConfig:
    name: str = "d3gzsl"
    hidden: int = 4096  # hidden width of G and D (f-CLSWGAN)
    embed_dim: int = 2048  # E_T / E_S width
    noise_dim: int = 0  # 0 = the attribute size (the authors' nz = attSize)

    def __post_init__(self) -> None:
        for key in ("hidden", "embed_dim"):
            check(getattr(self, key) >= 1, f"model.{key}", ">= 1", getattr(self, key))
        check(self.noise_dim >= 0, "model.noise_dim", ">= 0 (0 = attribute size)", self.noise_dim)


@dataclass(frozen=True)
class D3LossConfig:
    """L_G / L_D of the conditional WGAN-GP plus L_D3 = w_cls L_cls + w_od L_od + w_kd (L_be + L_kl)."""

    enabled: bool = True  # false: the plain conditional WGAN-GP base (no student, no teacher, no L_D3)
    w_cls: float = 1e-4  # alpha_cls
    w_od: float = 1e-4  # alpha_od (O2DBD); the authors' gzsl/ ships 0
    w_kd: float = 1e-4  # alpha_kd (ID2SD: L_be + L_kl); the authors' gzsl/ ships 0
    syn_per_unseen: int = 5  # synthetic rows per unseen class in each L_D3 (gzsl/: 5)
    n_critic: int = 5  # critic steps (batches) per generator step
    gp_weight: float = 10.0  # WGAN-GP lambda
    beta1: float = 0.5  # Adam beta1 of every optimiser (beta2 0.999)
    lr_student: float = 1e-4  # Adam lr of the student and the sigmoid (optim.lr: G and D)
    teacher_epochs: int = 30  # teacher pretraining passes over the training split
    teacher_batch: int = 128
    teacher_lr: float = 1e-4
    lr_every: int = 0  # learning-rate schedule period in epochs (passes); 0 = constant rates
    lr_gan_factor: float = 1.0  # G and D lr x this every lr_every epochs (reference: 1.09, growth)
    lr_student_factor: float = 1.0  # student (reference: 0.98)
    lr_sigmoid_factor: float = 1.0  # sigmoid (reference: 0.99)

    def __post_init__(self) -> None:
        for key in ("w_cls", "w_od", "w_kd", "gp_weight"):
            _nonneg(f"loss.{key}", getattr(self, key))
        for key in ("syn_per_unseen", "n_critic", "teacher_epochs", "teacher_batch"):
            check(getattr(self, key) >= 1, f"loss.{key}", ">= 1", getattr(self, key))
        check(0 <= self.beta1 < 1, "loss.beta1", "in [0, 1)", self.beta1)
        for key in ("lr_student", "teacher_lr", "lr_gan_factor", "lr_student_factor", "lr_sigmoid_factor"):
            v = getattr(self, key)
            check(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"loss.{key}", "a finite number > 0", v)
        check(self.lr_every >= 0, "loss.lr_every", ">= 0 (0 = constant)", self.lr_every)


@dataclass(frozen=True)
class D3EvalConfig(EvalConfig):
    """GZSL inference: (1 - w_student) log p_final + w_student log p_student, argmax over all classes
    (the weight w_student: `D3GZSLFamily.weights`, added to this block by the family).

    The final classifier (softmax over K) is trained before every evaluation on real training
    features plus syn_per_class generated features of each unseen class.
    """

    syn_per_class: int = 300  # generated features per unseen class (gzsl/: 300)
    classifier_space: Literal["auto", "student", "features"] = "auto"  # auto: student with D3, features without
    classifier_epochs: int = 20
    classifier_lr: float = 1e-3  # f-CLSWGAN's / CE-GZSL's; gzsl/'s 1e-4 underfits in 20 epochs (docs/d3gzsl.md)
    classifier_batch: int = 256
    refit_real_per_class: int = 32  # real rows per seen class kept with the model to refit for new classes

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("syn_per_class", "classifier_epochs", "classifier_batch", "refit_real_per_class"):
            check(getattr(self, key) >= 1, f"eval.{key}", ">= 1", getattr(self, key))
        check(self.classifier_space in ("auto", "student", "features"), "eval.classifier_space",
               "one of auto|student|features", self.classifier_space)
        check(math.isfinite(self.classifier_lr) and self.classifier_lr > 0, "eval.classifier_lr", "> 0",
               self.classifier_lr)
