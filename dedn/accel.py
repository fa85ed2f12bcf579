"""What the compute device does fast: native bf16, the autocast dtype a run should use, and that autocast.

bf16 is only worth it where the hardware multiplies it natively: CUDA compute capability >= 8.0
(Ampere on), or a CPU with AVX512_BF16 or AMX-BF16. Elsewhere (an AVX2-only CPU, a V100) torch
still runs bf16 matmuls, by conversion, about 100x slower than fp32 on an AVX2 CPU (a 1024^2
matmul: 0.8 against ~100 GFLOP/s), so asking for bf16 there falls back to fp32 with a warning.
"""
from __future__ import annotations

import functools
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from dedn.errors import ConfigError

__all__ = ["PRECISIONS", "cpu_flags", "fast_bf16", "autocast_dtype_for", "autocast", "gemm_rate", "set_tf32"]

PRECISIONS = ("auto", "fp32", "bf16")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def fast_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """(whether `device` multiplies bf16 natively, a sentence saying why) for messages and benchmarks."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        ok = major >= 8
        return ok, f"{name}, compute capability {major}.{minor} ({'>=' if ok else '<'} 8.0 for native bf16)"
    cap = torch.backends.cpu.get_cpu_capability()
    have = sorted(set(_CPU_BF16_FLAGS) & cpu_flags())
    if have:
        return True, f"CPU {cap} with {'/'.join(have)}"
    return False, f"CPU {cap} without avx512_bf16/amx_bf16 (bf16 matmuls run by conversion, far slower than fp32)"


def autocast_dtype_for(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of a run (None = fp32) for `train.precision` on `device`.

    auto: bf16 on a GPU with native bf16, fp32 elsewhere (CPU runs stay fp32: the reference variant's
    agreement with the authors' code is an fp32 result). bf16: bf16 where native; elsewhere fp32 and
    a warning, instead of running many times slower. Master weights stay fp32 either way: autocast
    casts per op, parameters and optimiser state are untouched.
    """
    if precision not in PRECISIONS:
        raise ConfigError("train.precision", f"one of {'|'.join(PRECISIONS)}", precision)
    device = torch.device(device)
    if precision == "fp32":
        return None
    ok, why = fast_bf16(device)
    if precision == "auto":
        return torch.bfloat16 if ok and device.type == "cuda" else None
    if not ok:
        warnings.warn(f"train.precision=bf16 asked for, but {why}: training in fp32 instead", RuntimeWarning,
                      stacklevel=2)
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """torch.autocast to `dtype` on `device`'s type (the run's `autocast_dtype_for`); nothing when dtype is None (fp32)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


_GEMM_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


def set_tf32(on: bool) -> None:
    """TF32 matmuls on CUDA (fp32 tensors, TF32 multiplies); nothing on a CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def gemm_rate(dtype: str = "fp32", n: int | None = None, reps: int | None = None, device: str = "cpu") -> float:
    """GFLOP/s of a square n^3 torch.mm in `dtype` (fp32 | tf32 | bf16) on `device` (the benchmarks' peak).

    On a GPU: n 8192, 5 warm-ups and 20 timed repetitions by default, so the clocks have ramped up
    from idle before the timing starts (n 4096 with 1 warm-up under-read the peak); on a CPU n 4096,
    1 warm-up, 3 repetitions. The best of the repetitions counts.
    """
    cuda = torch.device(device).type == "cuda"
    n = n or (8192 if cuda else 4096)
    reps = reps or (20 if cuda else 3)
    set_tf32(dtype == "tf32")
    a, b = (torch.randn(n, n, dtype=_GEMM_DTYPES[dtype], device=device) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(5 if cuda else 1):
        a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    set_tf32(False)  # fp32 stays fp32 after the probe
    return 2 * n**3 / best / 1e9
