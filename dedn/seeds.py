"""Seeds derived from a run's seed: one rule for every generator a run draws from.

`derive_seed(seed, *parts)` spreads (seed, rank, epoch, a purpose tag, ...) into independent,
reproducible 64-bit seeds (numpy's SeedSequence), so runtime randomness differs per rank and
epoch, and a resumed rank restarts from the same state without a checkpoint of its own.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

__all__ = ["derive_seed", "seed_everything", "seeded"]


def derive_seed(*parts: int) -> int:
    """A seed for the integers `parts` (e.g. optim.seed, rank, epoch): the same parts, the same seed."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's generators seeded with `seed` inside, and put back as they were after.

    `torch.manual_seed` seeds every CUDA generator too, so every visible device's state is forked
    (`fork_rng(devices=[])` would leave them re-seeded).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield
