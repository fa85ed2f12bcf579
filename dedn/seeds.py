"""Seeds derived from a run's seed: one rule for every generator a run draws from.

`derive_seed(seed, *parts)` spreads (seed, rank, epoch, a purpose tag, ...) into independent,
reproducible 64-bit seeds (numpy's SeedSequence), so runtime randomness differs per rank and
epoch, and a resumed rank restarts from the same state without a checkpoint of its own.
"""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_everything"]


def derive_seed(*parts: int) -> int:
    """A seed for the integers `parts` (e.g. optim.seed, rank, epoch): the same parts, the same seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
