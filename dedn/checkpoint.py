"""Checkpoints: one dict of tensors and plain Python values, written atomically, read with weights_only=True.

A checkpoint holds what `dedn.training.loop.run_phase` needs to continue bit-identically: the
unwrapped model state_dict, the state_dict of each of the family's optimisers (by name), the
config (`cfg.to_dict()`), phase, epoch, the best-so-far record, the history and the RNG states
(the full key list: docs/design.md#checkpoints). Only types that `torch.load(weights_only=True)`
accepts are stored (tensors, dicts, lists, str, int, float, bool, None), so loading never runs
arbitrary pickle code.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dedn.atomic import atomic_path
from dedn.errors import DednError, OutputError

__all__ = ["CheckpointError", "CheckpointWriteError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


class CheckpointError(DednError, ValueError):
    """A checkpoint file is missing, unreadable or not a dedn checkpoint."""

    def __init__(self, file: object, expected: str, found: object):
        self.file, self.expected, self.found = str(file), expected, found
        super().__init__(f"{self.file}: checkpoint: expected {expected}, found {found}")


class CheckpointWriteError(OutputError):
    """A checkpoint could not be written (a full or read-only disk, a file-size limit).

    Raised after the partial copy is removed: nothing half-written is left under a checkpoint's
    name, and the run's last whole checkpoint is where the same --name continues from.
    """

    def __init__(self, file: object, reason: str):
        self.file, self.path, self.reason = str(file), str(file), reason
        # OutputError's message is for any file; a checkpoint's says how to continue
        DednError.__init__(self, f"{self.file}: checkpoint: could not be written ({reason}); the partial copy was "
                                 f"removed. Free space at {Path(self.file).parent.parent} and run again with the same "
                                 "--name to continue from the last whole checkpoint")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write `state` to `path` via a temporary file in the same folder and an atomic rename."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; CheckpointError for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "a checkpoint file", "no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(path, "a torch.save file of tensors and plain values", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, "a dict", type(state).__name__)
    return state


# ---- RNG state as weights_only-safe values ---------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Torch CPU (and CUDA) generator, numpy's global MT19937 and Python's `random`, as tensors and lists."""
    np_state = np.random.get_state(legacy=False)  # {'bit_generator', 'state': {'key', 'pos'}, 'has_gauss', 'gauss'}
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),  # uint8 tensor
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():  # this process's device only: a resumed run may see other GPUs
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng_state_of(state["cuda"], torch.cuda.current_device()))


def cuda_rng_state_of(saved: Any, device: int) -> torch.Tensor:
    """The CUDA generator state for `device` in a checkpoint: one state (this process's device), or
    the per-device list older checkpoints hold (`get_rng_state_all`; restoring that whole list failed
    when the resumed run saw a different number of GPUs): its entry for `device`, else its first."""
    if isinstance(saved, torch.Tensor):
        return saved
    states = list(saved)
    return states[device] if 0 <= device < len(states) else states[0]
