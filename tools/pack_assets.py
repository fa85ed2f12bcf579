"""Write dedn/data/assets/<DS>.npz (the class side and image labels of CUB, SUN, AWA2) from a shared-style data folder.

    python tools/pack_assets.py [--data-dir ../shared/data] [--names CUB SUN AWA2]

The assets are plain compressed npz archives (no pickles, strings as fixed-width unicode), so
`dedn.data.sources.load_source(name)` works on a machine without the original files.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from dedn.data.sources import ASSET_DIR, load_source, source_to_arrays


def pack(name: str, data_dir: Path, out_dir: Path = ASSET_DIR) -> Path:
    """Pack one dataset; written to a temp name and renamed, so a crash leaves no half file."""
    arrays = source_to_arrays(load_source(name, data_dir / name))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.npz"
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data",
                   help="xlsa17 class-side folders (default: ../shared/data beside the checkout)")
    p.add_argument("--names", nargs="+", default=["CUB", "SUN", "AWA2"])
    p.add_argument("--out-dir", type=Path, default=ASSET_DIR)
    args = p.parse_args(argv)
    for name in args.names:
        out = pack(name, args.data_dir, args.out_dir)
        print(f"{out}: {out.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
