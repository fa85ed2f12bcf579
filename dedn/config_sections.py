"""The common sections of a run config (`optim`, `data`, `train`), the base of a family's `eval`
section, and `check`, the one way a section states what its values must be.

Families build their `model`, `loss` and `eval` blocks on these (`dedn.families.*.config`, and a
family outside the package the same way); `dedn.config` assembles the whole run config from
them and the registered families.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from dedn.errors import ConfigError

__all__ = ["PRESETS", "VARIANTS", "Variant", "check", "OptimConfig", "DataConfig", "TrainConfig", "EvalConfig",
           "MAX_WEIGHT_GRID_STEP", "check_weight_grid_step"]

Variant = Literal["paper", "reference"]
VARIANTS = ("paper", "reference")
PRESETS = ("cub", "sun", "awa2")  # the datasets with DEDN presets (the paper's three)


def check(cond: bool, key: str, expected: str, found: Any) -> None:
    """A ConfigError naming `key`, what it must be and what it is, unless `cond` holds (a section's __post_init__)."""
    if not cond:
        raise ConfigError(key, expected, found)


@dataclass(frozen=True)
class OptimConfig:
    """RMSprop as in the paper; epochs and batch size."""

    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    alpha: float = 0.99
    batch_size: int = 50
    epochs: int = 20
    max_steps_per_epoch: int = 0  # 0 = a full pass over the training split
    grad_clip: float = 0.0  # 0 = no clipping (the paper does not clip)
    seed: int = 0
    # Each of W workers takes batch_size rows a step (global batch = batch_size x W); the learning
    # rate used is lr x W (linear), lr x sqrt(W) (sqrt) or lr (none: the published single-GPU runs).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", "> 0", self.lr)
        check(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        check(0 < self.alpha < 1, "optim.alpha", "in (0, 1)", self.alpha)
        check(self.batch_size >= 1, "optim.batch_size", ">= 1", self.batch_size)
        check(self.epochs >= 1, "optim.epochs", ">= 1", self.epochs)
        check(self.max_steps_per_epoch >= 0, "optim.max_steps_per_epoch", ">= 0", self.max_steps_per_epoch)
        check(self.grad_clip >= 0, "optim.grad_clip", ">= 0", self.grad_clip)
        check(0 <= self.seed < 2**63, "optim.seed", "an integer in [0, 2**63)", self.seed)  # numpy SeedSequence range
        check(self.lr_scaling in ("none", "linear", "sqrt"), "optim.lr_scaling", "one of none|linear|sqrt",
               self.lr_scaling)

    def scaled_lr(self, lr: float, world_size: int) -> float:
        """`lr` under the lr_scaling rule for `world_size` workers (global batch batch_size x world_size)."""
        w = max(1, int(world_size))
        return lr * {"none": 1.0, "linear": float(w), "sqrt": math.sqrt(w)}[self.lr_scaling]


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset directory is and how it is streamed."""

    path: str = ""  # dataset directory (dataset.json); jobs make a demo dataset when empty
    class_balanced: bool = True  # reference: CUB/AWA2 balanced batches, SUN uniform
    shuffle_buffer: int = 4096  # rows held by the reader's shuffle buffer ...
    shuffle_buffer_mib: int = 1024  # ... at most this much feature storage: 14x14 maps hold 4x fewer rows
    loader_workers: int = 0  # DataLoader worker processes per training worker (streaming only)
    # Resident data: a split decoded once and kept (host memory, node-shared under Ray; or device memory),
    # batches gathered by index; the same batches as streaming. auto = resident when the split fits
    # resident_budget_mib (device memory on a GPU, host otherwise), streaming when it does not.
    resident: Literal["auto", "off", "host", "device"] = "auto"
    resident_budget_mib: int = 8192
    # On a GPU, auto's budget is this share of the device memory free when a phase starts (an H200's
    # half holds AWA2's 14 x 14 trainval, 17.6 GiB; a fixed 8 GiB did not); 0 keeps resident_budget_mib there.
    resident_device_fraction: float = 0.5
    resident_shared: bool = True  # under Ray: the node's one decoded copy (False: each worker decodes its own)

    def __post_init__(self) -> None:
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1", self.shuffle_buffer)
        check(self.shuffle_buffer_mib >= 1, "data.shuffle_buffer_mib", ">= 1", self.shuffle_buffer_mib)
        check(self.loader_workers >= 0, "data.loader_workers", ">= 0", self.loader_workers)
        check(self.resident in ("auto", "off", "host", "device"), "data.resident", "one of auto|off|host|device",
               self.resident)
        check(self.resident_budget_mib >= 0, "data.resident_budget_mib", ">= 0", self.resident_budget_mib)
        check(0.0 <= self.resident_device_fraction <= 0.9, "data.resident_device_fraction",
              "a share of the GPU's free memory in [0, 0.9] (0: resident_budget_mib)", self.resident_device_fraction)

    def shuffle_rows(self, row_bytes: int) -> int:
        """Rows of the shuffle buffer for rows of `row_bytes` stored bytes: the row count, capped by the MiB budget.

        Keeps a worker's memory independent of the feature-map size (CUB 2048x7x7 fp16: 4096
        rows, 0.8 GiB; 2048x14x14: 1337 rows, 1 GiB). At least one row.
        """
        return max(1, min(self.shuffle_buffer, (self.shuffle_buffer_mib << 20) // max(1, int(row_bytes))))


@dataclass(frozen=True)
class TrainConfig:
    """How the step runs on the hardware: precision, compilation and DDP's communication.

    None of these changes the maths beyond rounding; docs/scaling.md states each one's measured
    effect on step time and on the loss.
    """

    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a GPU with native bf16, else fp32
    compile: bool = False  # torch.compile the training module (off: it costs more than it saves on CPU)
    ddp_bucket_mb: float = 25.0  # DDP gradient bucket size (torch's default)
    ddp_grad_as_bucket_view: bool = True  # gradients are views into the buckets: no copy, less memory
    # Gradient compression: bf16 (NCCL only) or fp16 (gloo or NCCL) halves the all-reduce bytes.
    # (No static_graph key: on torch 2.13 it leaves some of DEDN's gradients un-averaged; docs/scaling.md.)
    ddp_comm_hook: Literal["none", "bf16", "fp16"] = "none"

    def __post_init__(self) -> None:
        check(self.precision in ("auto", "fp32", "bf16"), "train.precision", "one of auto|fp32|bf16", self.precision)
        check(self.ddp_bucket_mb > 0, "train.ddp_bucket_mb", "> 0", self.ddp_bucket_mb)
        check(self.ddp_comm_hook in ("none", "bf16", "fp16"), "train.ddp_comm_hook", "one of none|bf16|fp16",
               self.ddp_comm_hook)


# The largest grid step of the post-hoc weight fit, the one bound of eval.weight_grid_step (the config's
# check and the grid itself, dedn.families.base.weight_grid_values). At most 0.5, the bound every run
# config has always had: the grid {0, step, ..., 1} then holds a point inside (0, 1) and no two of its
# points are more than 0.5 apart, so a fit is never reduced to one part or the other (step 1: {0, 1}).
MAX_WEIGHT_GRID_STEP = 0.5


def check_weight_grid_step(step: float) -> None:
    """A ConfigError naming eval.weight_grid_step unless it is in (0, MAX_WEIGHT_GRID_STEP]."""
    check(isinstance(step, (int, float)) and not isinstance(step, bool) and 0 < step <= MAX_WEIGHT_GRID_STEP,
          "eval.weight_grid_step", f"in (0, {MAX_WEIGHT_GRID_STEP}]", step)


@dataclass(frozen=True)
class EvalConfig:
    """How a family's inference weights are chosen on validation; the family adds the weights themselves
    (`ModelFamily.weights`; DEDN: lambda_rc, lambda_e; MSDN: w1), each a float in [0, 1]."""

    calibration: float = 0.0  # calibrated stacking: subtracted from seen-class scores at evaluation
    fit_weights: bool = True  # refit the family's inference weights on validation outputs each epoch
    weight_grid_step: float = 0.05  # grid step of that fit, on [0, 1]
    batch_size: int = 200

    def __post_init__(self) -> None:
        check(self.calibration == self.calibration, "eval.calibration", "a number", self.calibration)
        check_weight_grid_step(self.weight_grid_step)
        check(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
