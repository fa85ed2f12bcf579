"""The network under DistributedDataParallel and the collective the loop sums with: what every Ray
Train worker wraps its model in (`dedn.training.driver.train_func`), and what the device check
(`bench/gpu_check.py`) runs without Ray. No Ray, no MLflow here.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dedn.config import RunConfig
from dedn.errors import ConfigError

__all__ = ["TorchCollective", "ddp", "single_process_group"]


class TorchCollective:
    """Sum, max and broadcast over the worker group with torch.distributed (the loop's `Collective`)."""

    def sum_(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def max_(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)

    def broadcast_(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=0)


def ddp(net: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """DDP with the run's train.ddp_* options. The all-reduce of each bucket starts as soon as its
    gradients are ready, so it overlaps the rest of the backward pass (docs/scaling.md).
    Buffers are broadcast from rank 0 before each forward (DDP's default): D3GZSL's feature bank
    and scaler ranges are buffers that ranks fill from their own batches.
    """
    t = cfg.train
    wrapped = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=t.ddp_bucket_mb,
                  gradient_as_bucket_view=t.ddp_grad_as_bucket_view)
    if t.ddp_comm_hook != "none":  # gradients travel as bf16/fp16 (half the bytes), are averaged back into fp32
        wrapped.register_comm_hook(None, getattr(default_hooks, f"{t.ddp_comm_hook}_compress_hook"))
    return wrapped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def single_process_group(device: torch.device) -> Iterator[str]:
    """A torch.distributed group of world size 1 on this machine (NCCL on a GPU, gloo on the CPU), so one
    process runs the collectives and the DDP wrapper exactly as a cluster's ranks do; yields the backend."""
    if dist.is_initialized():
        raise ConfigError("torch.distributed", "no process group yet", "one already initialised",
                          "single_process_group")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend, rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield backend
    finally:
        dist.destroy_process_group()
