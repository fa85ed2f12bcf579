"""Measure `prepare_data.py from-images` end to end: images/s and the peak memory of the whole pipeline.

    python bench/benchmark_extract.py                       # 600 and 2400 generated JPEGs at 448
    python bench/benchmark_extract.py --images 600 2400 8000 --size 448

The point is the memory bound. The authors' preprocessing.py holds every feature map until it
writes one HDF5 file: N x 2048 x 14 x 14 float32 at w = 448, 1.6 MB an image. This pipeline holds
a few batches in flight and one block, whatever N is. The backbone here is a stand-in with
ResNet-101's output shape (2048 x w/32 x w/32: an average pool and a 1 x 1 convolution), so the
figures measure decoding, transfer and writing, not ResNet-101 (on a GPU node, the backbone rate
is `bench/gpu_check.py`'s). The images are JPEGs of the datasets' typical sizes
(`benchmark_preprocess.generate`), on a made-up class side of 20 classes.

Memory: the largest sum, over the driver and every process Ray started, of resident memory,
sampled every 0.2 s (shared pages, such as the object store's, count in each process that
touched them: an upper bound).
"""
from __future__ import annotations

import argparse
import os
import runpy
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dedn.cli import HelpFormatter

# the JPEG generator of the script beside this one, by file (run through runpy, its folder is not on the path)
generate = runpy.run_path(str(Path(__file__).with_name("benchmark_preprocess.py")), run_name="benchmark_preprocess")[
    "generate"]

K, D = 20, 8


def wide(weights: str | None = None) -> nn.Module:
    """ResNet-101's output shape at a fraction of its cost: (B, 3, w, w) -> (B, 2048, w/32, w/32)."""
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Conv2d(3, 2048, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(nn.functional.avg_pool2d(x, 32))

    torch.manual_seed(0)
    return Wide()


def xlsa17_files(folder: Path, files: list[str]) -> tuple[Path, Path, Path]:
    """res101.mat, att_splits.mat and word vectors for `files` on a made-up class side (K classes, D attributes)."""
    import pickle

    import scipy.io

    n = len(files)
    labels = np.arange(n) % K
    seen, unseen = np.arange(15), np.arange(15, K)
    rng = np.random.default_rng(0)
    test_seen = np.isin(labels, seen) & (rng.random(n) < 0.2)
    trainval = np.isin(labels, seen) & ~test_seen
    loc = lambda mask: (np.flatnonzero(mask) + 1).reshape(-1, 1)  # noqa: E731 - 1-based, as xlsa17's
    att = rng.random((D, K))
    cells = np.empty((n, 1), dtype=object)
    for i, f in enumerate(files):
        cells[i, 0] = np.array(["/authors/machine/" + f])
    names = np.empty((K, 1), dtype=object)
    for k in range(K):
        names[k, 0] = np.array([f"{k:03d}.class_{k}"])
    scipy.io.savemat(folder / "res101.mat", {"image_files": cells, "labels": (labels + 1).reshape(-1, 1).astype(float)})
    scipy.io.savemat(folder / "att_splits.mat", {
        "att": att / np.linalg.norm(att, axis=0), "original_att": att * 100, "allclasses_names": names,
        "trainval_loc": loc(trainval), "test_seen_loc": loc(test_seen), "test_unseen_loc": loc(np.isin(labels, unseen)),
        "train_loc": loc(trainval & (labels < 10)), "val_loc": loc(trainval & (labels >= 10))})
    (folder / "attributes.txt").write_text("".join(f"{d + 1} attribute_{d}\n" for d in range(D)))
    with open(folder / "BENCH_attribute.pkl", "wb") as fh:
        pickle.dump(rng.standard_normal((D, 300)).astype(np.float32), fh)
    return folder / "res101.mat", folder / "att_splits.mat", folder / "BENCH_attribute.pkl"


class PeakMemory(threading.Thread):
    """The largest summed RSS of this process and all its descendants (Ray's processes among them)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = 0, threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._done.wait(0.2):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[600, 2400], help="dataset sizes to run")
    ap.add_argument("--size", type=int, default=448, help="crop side w (448: 14 x 14 maps)")
    ap.add_argument("--actors", type=int, default=1, help="backbone actors")
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent),
                                                *filter(None, [os.environ.get("PYTHONPATH")])])
    from dedn.extraction import ExtractSettings, extract_images

    print(f"{os.cpu_count()} CPUs; backbone: a stand-in with ResNet-101's output shape; w = {args.size}")
    print("| images | wall s | images/s | peak memory (all processes) | authors' script holds (float32 maps) |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for n in args.images:
            images = root / f"images-{n}"
            images.mkdir()
            paths = generate(images, n)
            files = [p.name for p in paths]
            res101, att, wv = xlsa17_files(root, files)
            out = root / f"ds-{n}"
            c, h = 2048, args.size // 32
            watch = PeakMemory()
            watch.start()
            t0 = time.perf_counter()
            extract_images(images, res101, att, wv, "BENCH", out,
                           ExtractSettings(size=args.size, backbone="benchmark_extract:wide", actors=args.actors),
                           attribute_dir=root, progress=False)
            wall = time.perf_counter() - t0
            peak = watch.stop()
            held = n * c * h * h * 4
            print(f"| {n} | {wall:.1f} | {n / wall:.1f} | {peak / 2**30:.2f} GiB | {held / 2**30:.2f} GiB |", flush=True)
            shutil.rmtree(out)
            shutil.rmtree(images)


if __name__ == "__main__":
    main()
