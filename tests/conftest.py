"""Shared fixtures: a seeded RNG for every test and a tiny semi-synthetic CUB-derived dataset."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

CUB_SOURCE = Path("/work/shared/data/CUB")  # real class-side files; the packaged asset otherwise


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def cub_source() -> Path | None:
    return CUB_SOURCE if (CUB_SOURCE / "att_splits.mat").exists() else None


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A FeatureDataset on the real CUB class side: C=16, 2x2 maps, 2 images per class and split.

    Small enough for engine and distributed smoke tests (trainval 300 rows, train 200 rows).
    """
    from dedn.data import FeatureDataset
    from dedn.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("tiny") / "cub_tiny"
    write_synthetic(root, "CUB", cub_source(), channels=16, height=2, width=2, images_per_class=2, seed=0,
                    progress=False)
    return FeatureDataset.open(root)
