"""Measure image decoding + preprocessing (dedn/data/images.py) on one CPU core: images/s at 448 and 224.

    python bench/benchmark_preprocess.py                         # generated JPEGs of typical sizes
    python bench/benchmark_preprocess.py --images DIR --limit 500  # your own images

The generated JPEGs have the sizes typical of the datasets (CUB around 500 x 375, SUN from
about 300 x 200 up to 1000 x 750, AWA2 often larger): quality 90, a smooth random image each, so
the decoder does real work. Pillow decodes and resizes, and numpy normalises, on one thread, so the
figure is per core: a decode pool of N processes does about N times this.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from dedn.cli import HelpFormatter
from dedn.data.images import load_image

SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (1024, 768), (300, 225)]


def generate(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC)  # smooth, photo-like content
        p = folder / f"img{i:05d}.jpg"
        img.save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--images", default="", help="a folder of images (default: generated JPEGs)")
    ap.add_argument("--limit", type=int, default=240, help="images timed")
    ap.add_argument("--sizes", type=int, nargs="+", default=[448, 224], help="crop sizes w (Resize(w) + CenterCrop(w))")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        if args.images:
            paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            paths = paths[: args.limit]
        else:
            paths = generate(Path(d), args.limit)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{len(paths)} images, {mb:.1f} MiB of files ({'generated JPEGs' if not args.images else args.images})")
        for size in args.sizes:
            load_image(paths[0], size)  # warm-up: Pillow's plugins load on first use
            t0 = time.perf_counter()
            for p in paths:
                load_image(p, size)
            dt = time.perf_counter() - t0
            print(f"  w = {size}: {len(paths) / dt:7.1f} images/s on one core ({1000 * dt / len(paths):.1f} ms each)")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
