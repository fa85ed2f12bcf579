"""D3GZSL (Wang et al., AAAI 2024) as a model family, on the conditional WGAN-GP base of the authors'
`gzsl/` integration (f-CLSWGAN-shaped G and D on the class attribute vectors).

Facts: ../shared/docs/d3gzsl.md; our choices and what the default fixes: docs/d3gzsl.md.

* Phase start (`prepare`): pool the training split (mean over H x W), fit the min-max scaler on it,
  pretrain the teacher on it (seen classes, then frozen). Identical on every rank (the whole split,
  fixed seed), so nothing needs communicating; a resumed phase takes both from its checkpoint.
* Each batch (`train_step`) is one critic step (G frozen: L_D + L_D3 steps D, student, sigmoid);
  every `loss.n_critic`-th batch is also followed by the generator step on that batch (D frozen:
  L_G + L_D3 steps G, student, sigmoid). `loss.enabled=false` (`d3.enabled=false`) drops the
  student and L_D3: the plain conditional WGAN-GP.
* Before each evaluation (`before_eval`): the final softmax classifier over all K classes is fitted
  on the real training features plus `eval.syn_per_class` generated features per unseen class,
  seeded by (seed, epoch), the same on every rank.
* Scores: the final classifier's and the student's log-probabilities, combined as
  (1 - w_student) final + w_student student; `eval.w_student` is fitted on validation like DEDN's
  lambdas (0 = the final classifier, the default; 1 = the student, the authors' default mode).
* Variants: `paper` (default) follows the method with the code's slips fixed; `reference` uses the
  authors' `gzsl/` loss forms, weights and learning-rate schedule (presets' `variants.reference`).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.errors import ConfigError
from dedn.families import register_family
from dedn.families.base import ModelFamily, PhaseData, PostHocWeights, StepContext, weight_grid_values
from dedn.families.capabilities import (
    AliasesSections, PreparesPhases, RefitsBeforeEval, RefitsForNewClasses, WrapsForDDP,
)
from dedn.families.d3gzsl.classifier import fit_final_classifier, synthesize
from dedn.families.d3gzsl.config import D3EvalConfig, D3LossConfig, D3ModelConfig
from dedn.families.d3gzsl.losses import D3Weights
from dedn.families.d3gzsl.model import D3GZSL
from dedn.families.d3gzsl.step import D3Nets, StepConfig, critic_step, generator_step
from dedn.protocol import ClassProtocol
from dedn.seeds import derive_seed

if TYPE_CHECKING:
    from dedn.config import RunConfig
    from dedn.data.class_side import ClassSide

__all__ = ["D3GZSLFamily", "D3Train", "FAMILY", "classifier_space"]

TRAINED = ("generator", "critic", "student", "sigmoid")  # the networks with an optimiser (and a DDP wrapper)


def classifier_space(cfg: "RunConfig") -> str:
    """eval.classifier_space with auto resolved: the student's embedding with D3, the features without."""
    space = cfg.eval.classifier_space
    return ("student" if cfg.loss.enabled else "features") if space == "auto" else space


class D3Train(nn.Module):
    """The training-time module: forward = the network's pooled, scaled features (one call per step,
    where the driver's hooks sit); `nets` the trained networks, each in its own DDP wrapper."""

    def __init__(self, model: nn.Module, ddp: Callable[[nn.Module], nn.Module]):
        super().__init__()
        self.module = model
        self.wrapped = {name: ddp(getattr(model, name)) for name in TRAINED}  # not submodules: no duplicate params

    def forward(self, x: Tensor) -> Tensor:
        return self.module.features(x)


def _pooled(data: PhaseData, device: torch.device) -> tuple[Tensor, Tensor]:
    """(raw pooled features (N, C) float32, labels (N,)) of the phase's training split, read once per phase."""
    if "x" not in data.cache:
        xs, ys = [], []
        for b in data.read():
            xs.append(b.features.float().mean(dim=(2, 3)))
            ys.append(b.labels)
        data.cache["x"], data.cache["y"] = torch.cat(xs), torch.cat(ys).long()
    return data.cache["x"].to(device), data.cache["y"].to(device)


class D3GZSLFamily(ModelFamily, WrapsForDDP, PreparesPhases, RefitsBeforeEval, RefitsForNewClasses, AliasesSections):
    name = "d3gzsl"
    title = "D3GZSL"
    model_config = D3ModelConfig
    loss_config = D3LossConfig
    eval_base = D3EvalConfig  # the final classifier's settings
    # (1 - w_student) log p_final + w_student log p_student: 0 the final classifier alone (default), 1 the
    # student (the authors' default mode)
    weights = {"w_student": 0.0}
    loss_parts = ("loss", "critic", "wasserstein", "gp", "d3", "d3_cls", "d3_kl", "d3_be", "d3_od",
                  "generator", "g_d3", "g_d3_cls", "g_d3_kl", "g_d3_be", "g_d3_od", "teacher")
    package = "dedn.families.d3gzsl"
    section_aliases = {"d3": "loss"}

    # ---- the network ------------------------------------------------------------------------
    def resolve(self, cfg: "RunConfig", class_side: "ClassSide") -> "RunConfig":
        if classifier_space(cfg) == "student" and not cfg.loss.enabled:
            raise ConfigError("eval.classifier_space", "features or auto when loss.enabled is false (no student is "
                              "trained, its embedding would be random)", "student")
        return cfg

    def build(self, cfg: "RunConfig", class_side: "ClassSide", feature_shape: tuple[int, int, int],
              meta: Mapping[str, Any] | None = None) -> nn.Module:
        protocol = ClassProtocol.of_run(cfg.protocol, class_side)
        return D3GZSL(cfg.model, class_attributes=torch.from_numpy(np.asarray(class_side.attributes, np.float32)),
                      feature_shape=feature_shape, seen=protocol.seen, unseen=protocol.unseen,
                      classifier_space=classifier_space(cfg), bank_per_class=cfg.eval.refit_real_per_class)

    # ---- training ---------------------------------------------------------------------------
    def optimizers(self, cfg: "RunConfig", model: nn.Module) -> dict[str, torch.optim.Optimizer]:
        """Separate Adams (the authors'): G and D at optim.lr, student and sigmoid at loss.lr_student."""
        betas = (cfg.loss.beta1, 0.999)
        lrs = {"generator": cfg.optim.lr, "critic": cfg.optim.lr, "student": cfg.loss.lr_student,
               "sigmoid": cfg.loss.lr_student}
        # fused: one kernel per optimiser step instead of a dozen elementwise passes (same update rule)
        return {name: torch.optim.Adam(getattr(model, name).parameters(), lr=lrs[name], betas=betas, fused=True)
                for name in TRAINED}

    def wrap(self, model: nn.Module, ddp: Callable[[nn.Module], nn.Module]) -> nn.Module:
        return D3Train(model, ddp)

    def _set_lrs(self, cfg: "RunConfig", optimizers: Mapping[str, torch.optim.Optimizer], epoch: int) -> None:
        """lr = base x factor^floor((epoch - 1) / lr_every): a function of the epoch, so a resumed run matches."""
        lo = cfg.loss
        periods = (max(epoch, 1) - 1) // lo.lr_every if lo.lr_every else 0
        base = {"generator": (cfg.optim.lr, lo.lr_gan_factor), "critic": (cfg.optim.lr, lo.lr_gan_factor),
                "student": (lo.lr_student, lo.lr_student_factor), "sigmoid": (lo.lr_student, lo.lr_sigmoid_factor)}
        for name, opt in optimizers.items():
            lr, factor = base[name]
            for group in opt.param_groups:
                group["lr"] = lr * factor ** periods

    def train_step(self, model: nn.Module, x: Tensor, y: Tensor, ctx: StepContext) -> dict[str, float]:
        cfg, lo = ctx.cfg, ctx.cfg.loss
        train = model if isinstance(model, D3Train) else D3Train(model, lambda m: m)
        net = train.module
        feats = train(x)  # pooled and scaled (B, C)
        w = train.wrapped
        nets = D3Nets(w["generator"], w["critic"], net.teacher, w["student"], w["sigmoid"], net.class_attributes,
                      net.seen_ids, net.unseen_ids, generator_raw=net.generator, critic_raw=net.critic)
        step_cfg = StepConfig(D3Weights(lo.w_cls, lo.w_od, lo.w_kd), lo.enabled, lo.syn_per_unseen, lo.gp_weight,
                              "reference" if cfg.variant == "reference" else "method")
        self._set_lrs(cfg, ctx.optimizers, ctx.epoch)
        with ctx.autocast():
            values = critic_step(nets, ctx.optimizers, feats, y, step_cfg, check=ctx.check_finite)
            values["loss"] = values["critic"] + values.get("d3", 0.0)
            if ctx.step % lo.n_critic == 0:
                values.update(generator_step(nets, ctx.optimizers, feats, y, step_cfg, check=ctx.check_finite))
        return values

    # ---- phase start: scaler and teacher ------------------------------------------------------
    def prepare(self, model: nn.Module, data: PhaseData, ctx: StepContext) -> None:
        x, y = _pooled(data, ctx.device)
        model.scaler.fit(x)
        if ctx.cfg.loss.enabled:
            self.pretrain_teacher(model, model.scaler(x), y, ctx.cfg)

    @staticmethod
    def pretrain_teacher(model: nn.Module, x: Tensor, y: Tensor, cfg: "RunConfig") -> float:
        """Cross-entropy over the seen classes (mapped ids), Adam, `teacher_epochs` shuffled passes with
        drop_last, seeded by optim.seed alone (every rank the same teacher); then frozen. Returns the
        last epoch's mean loss."""
        lo = cfg.loss
        teacher = model.teacher
        mapped = torch.full((model.num_classes,), -1, dtype=torch.long, device=y.device)
        mapped[model.seen_ids] = torch.arange(len(model.seen_ids), device=y.device)
        t = mapped[y]
        if (t < 0).any():
            raise ConfigError("data", "training rows of seen classes only", "a row of a class outside the phase's seen set")
        g = torch.Generator().manual_seed(derive_seed(cfg.optim.seed, 17))
        teacher.requires_grad_(True)
        opt = torch.optim.Adam(teacher.parameters(), lr=lo.teacher_lr, betas=(lo.beta1, 0.999), fused=True)
        n, bs, last = x.shape[0], min(lo.teacher_batch, x.shape[0]), 0.0
        for _ in range(lo.teacher_epochs):
            order = torch.randperm(n, generator=g).to(x.device)
            # summed on the device in float64 (what adding `loss.item()`s gives), read once per epoch:
            # a read per step made the host wait for the GPU about 1,100 times per phase
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            steps = n // bs
            for s in range(steps):
                idx = order[s * bs:(s + 1) * bs]
                loss = F.cross_entropy(teacher(x[idx])[1], t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach().double()
            last = total.item() / max(1, steps)
        teacher.requires_grad_(False)
        return last

    # ---- before each evaluation: the final classifier ----------------------------------------
    def before_eval(self, model: nn.Module, data: PhaseData, ctx: StepContext) -> None:
        x, y = _pooled(data, ctx.device)
        real = model.scaler(x)
        self._fill_bank(model, real, y)
        clf = self._fit(model, ctx.cfg, real, y, model.class_attributes, model.unseen_ids,
                        seed=derive_seed(ctx.cfg.optim.seed, ctx.epoch, 29))
        model.classifier.load_state_dict(clf.state_dict())

    @staticmethod
    def _fill_bank(model: nn.Module, real: Tensor, y: Tensor) -> None:
        """Up to bank_per_class real rows of each seen class, in file order."""
        n = model.bank_per_class
        bx, by = torch.zeros_like(model.bank_x), torch.full_like(model.bank_y, -1)
        for i, c in enumerate(model.seen_ids.tolist()):
            rows = (y == c).nonzero().flatten()[:n]
            bx[i * n:i * n + len(rows)] = real[rows].to(bx.dtype)
            by[i * n:i * n + len(rows)] = c
        model.bank_x.copy_(bx)
        model.bank_y.copy_(by)

    @staticmethod
    @torch.no_grad()
    def _fit(model: nn.Module, cfg: "RunConfig", real: Tensor, y: Tensor, class_attributes: Tensor,
             generated_ids: Tensor, *, seed: int) -> nn.Linear:
        """The final classifier over len(class_attributes) classes: real rows plus eval.syn_per_class
        generated rows of each class in generated_ids, in the classifier's space."""
        ev = cfg.eval
        fake, fy = synthesize(model.generator, class_attributes, generated_ids, ev.syn_per_class, seed)
        feats = torch.cat([real, fake])
        inputs = model.classifier_input(feats)
        with torch.enable_grad():
            return fit_final_classifier(inputs, torch.cat([y, fy]), int(class_attributes.shape[0]),
                                        epochs=ev.classifier_epochs, batch_size=ev.classifier_batch,
                                        lr=ev.classifier_lr, betas=(cfg.loss.beta1, 0.999), seed=seed)

    # ---- scoring ------------------------------------------------------------------------------
    def score_parts(self, out: Any, class_attributes: Tensor | None = None) -> dict[str, Tensor]:
        return {"final": out.final.float(), "student": out.student.float()}

    def coefficients(self, cfg: "RunConfig", weights: Mapping[str, float], names: Sequence[str]) -> list[float]:
        w = float(weights["w_student"])
        table = {"final": 1.0 - w, "student": w}
        return [table[n] for n in names]

    def weight_grid(self, cfg: "RunConfig") -> PostHocWeights:
        """w_student on the grid; fixed at 0 without D3 (no student is trained)."""
        values = weight_grid_values(cfg.eval.weight_grid_step) if cfg.loss.enabled else (0.0,)
        return PostHocWeights(self.weight_names, (values,))

    def for_classes(self, model: nn.Module, cfg: "RunConfig", class_attributes: Tensor, *, seen: Sequence[int],
                    unseen: Sequence[int]) -> nn.Module:
        """A copy whose final classifier covers the K + E classes of class_attributes: the banked real
        rows of the seen classes plus eval.syn_per_class generated rows of every unseen and new class.
        The generator, student and teacher are untouched."""
        k = int(model.class_attributes.shape[0])
        a = class_attributes.to(model.class_attributes.device, torch.float32)
        if a.shape[0] == k and torch.equal(a, model.class_attributes):
            return model
        out = copy.deepcopy(model)
        keep = out.bank_y >= 0
        real, y = out.bank_x[keep].float(), out.bank_y[keep]
        gen_ids = torch.cat([torch.as_tensor(sorted(unseen), dtype=torch.long), torch.arange(k, a.shape[0])])
        clf = self._fit(out, cfg, real, y, a, gen_ids.to(a.device), seed=derive_seed(cfg.optim.seed, a.shape[0], 31))
        out.classifier = clf
        out.class_attributes = a
        return out.eval()


FAMILY = register_family(D3GZSLFamily())
