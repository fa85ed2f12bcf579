"""The small semi-synthetic demo dataset that `make demo` trains on when no `--data` is given.

Real AWA2 class side (attributes, word vectors, xlsa17 splits, packaged in `dedn/data/assets`) with
generated feature maps (`dedn.data.synthetic`), kept small so a 2-core machine trains it in minutes.
Numbers obtained on it are semi-synthetic and say nothing about DEDN on real images.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from dedn.data import MANIFEST_FILE, FeatureDataset
from dedn.data.synthetic import write_synthetic
from dedn.errors import DatasetError
from dedn.home import dedn_home

__all__ = ["DEMO_SIZES", "demo_dir", "ensure_demo_dataset"]

# C x H x W = 128 x 4 x 4 maps, at most 40 images per class and split: about 1,100 training images.
# AWA2 (50 classes, 85 attributes) rather than CUB: at this size CUB (200 classes, 312 attributes)
# stays near chance for many epochs, AWA2 learns visibly within a few.
DEMO_SIZES: dict[str, int] = {"channels": 128, "height": 4, "width": 4, "images_per_class": 40, "seed": 0}
DEMO_NAME = "AWA2"


def demo_dir() -> Path:
    """`<DEDN_HOME>/data/demo-awa2-semisynthetic` (DEDN_HOME defaults to ~/.dedn)."""
    return dedn_home() / "data" / "demo-awa2-semisynthetic"


def ensure_demo_dataset(root: str | os.PathLike[str] | None = None, *, progress: bool = True) -> tuple[Path, bool]:
    """The demo dataset directory, written first when missing or unreadable. Returns (path, created)."""
    path = Path(root) if root else demo_dir()
    if (path / MANIFEST_FILE).exists():
        try:
            FeatureDataset.open(path)
            return path, False
        except DatasetError:
            pass  # half-written or from an older schema: write it again
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # the packaged AWA2 class side has its 4 known missing-value marks (exactly -1), set to 0: expected
        # here, so not worth a warning on every first demo; a user's own files still warn (sources.py)
        warnings.filterwarnings("ignore", message=r".*original_att holds \d+ negative values", category=UserWarning)
        write_synthetic(path, DEMO_NAME, None, overwrite=True, progress=progress, **DEMO_SIZES)  # type: ignore[arg-type]
    return path, True
