"""Measure ShardReader throughput: Parquet (fp16) -> float32 tensors, MB/s and rows/s, and peak RSS.

    python bench/benchmark_reader.py --rows 4000 --channels 2048 --height 7 --width 7
    python bench/benchmark_reader.py --data /path/to/dataset --split trainval
    python bench/benchmark_reader.py --data /path/to/dataset --split train --resident --class-balanced

--resident: decode the split once (timed), then time the epochs' batch assembly from the resident
tensor (the training reader's plan, gathered by index; data.resident) instead of streaming.

Without --data it writes a synthetic dataset (random class side, random features) to a temp dir.
MB/s counts the storage bytes of the features read (rows x C x H x W x itemsize).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dedn.cli import HelpFormatter
from dedn.data.class_side import ClassSide, normalize_rows
from dedn.data import SPLITS, DatasetWriter, FeatureDataset, split_classes
from dedn.data.reader import ShardReader
from dedn.data.resident import decode_split


def random_class_side(k: int = 20, d: int = 16, g: int = 8, seed: int = 0) -> ClassSide:
    """A random class side: first 3/4 of the classes seen, the seen half train, the rest val."""
    rng = np.random.default_rng(seed)
    raw = rng.random((k, d))
    seen = np.arange(3 * k // 4)
    return ClassSide(
        name="bench", class_names=tuple(f"c{i}" for i in range(k)), attribute_names=tuple(f"a{i}" for i in range(d)),
        attributes_raw=raw, attributes=normalize_rows(raw), word_vectors=rng.standard_normal((d, g)).astype(np.float32),
        seen_classes=seen, unseen_classes=np.arange(seen.size, k), train_classes=seen[: seen.size // 2],
        val_classes=seen[seen.size // 2:], clusters={"halved": {"first": list(range(d // 2)), "second": list(range(d // 2, d))}},
    )


def write_synthetic(root: Path, rows: int, shape: tuple[int, int, int], chunk: int = 256) -> None:
    """`rows` rows in every split (random features), written `chunk` rows at a time."""
    cs = random_class_side()
    rng = np.random.default_rng(0)
    with DatasetWriter(root, class_side=cs, feature_shape=shape) as w:
        for split in SPLITS:
            # The benchmark reads one split; the others get a token row so the dataset is valid.
            n = rows if split == "trainval" else 1
            with w.split(split) as s:
                for start in range(0, n, chunk):
                    m = min(chunk, n - start)
                    labels = rng.choice(split_classes(cs, split), m)
                    # each split its own ids: a test image that is also a training image is refused
                    s.add(SPLITS.index(split) * rows + np.arange(start, start + m), labels, rng.standard_normal((m, *shape), dtype=np.float32))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, help="an existing dataset directory (default: write a synthetic one)")
    p.add_argument("--split", default="trainval", help="split to read")
    p.add_argument("--rows", type=int, default=4000, help="rows of the synthetic dataset (without --data)")
    p.add_argument("--channels", type=int, default=2048, help="C of the synthetic feature maps")
    p.add_argument("--height", type=int, default=7, help="H of the synthetic feature maps")
    p.add_argument("--width", type=int, default=7, help="W of the synthetic feature maps")
    p.add_argument("--batch-size", type=int, default=50, help="rows per batch")
    p.add_argument("--buffer-rows", type=int, default=2048, help="shuffle buffer (data.shuffle_buffer_rows)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the split, each timed")
    p.add_argument("--class-balanced", action="store_true", help="class-balanced batches (data.class_balanced)")
    p.add_argument("--out-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the batches handed over (float16: the storage dtype, as training reads them)")
    p.add_argument("--resident", action="store_true", help="assemble batches from the decoded split (data.resident)")
    args = p.parse_args(argv)

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="dedn-bench-")
        args.data = Path(tmp.name) / "ds"
        t0 = time.perf_counter()
        write_synthetic(args.data, args.rows, (args.channels, args.height, args.width))
        print(f"wrote {args.rows} rows of {args.channels}x{args.height}x{args.width} in {time.perf_counter() - t0:.1f} s")
    ds = FeatureDataset.open(args.data)
    itemsize = np.dtype(ds.storage_dtype).itemsize
    resident = None
    if args.resident:
        t0 = time.perf_counter()
        resident = decode_split(ds, args.split)
        dt = time.perf_counter() - t0
        print(f"decoded {args.split} once: {resident.num_rows} rows, {resident.nbytes / 2**20:.0f} MiB in {dt:.2f} s "
              f"({resident.nbytes / 1e6 / dt:.0f} MB/s)")
    reader = ShardReader(ds, args.split, batch_size=args.batch_size, buffer_rows=args.buffer_rows,
                         class_balanced=args.class_balanced, out_dtype=getattr(torch, args.out_dtype),
                         resident=resident)
    print(f"{ds}\nshards={len(ds.split(args.split).shards)} units={len(reader._units)} "
          f"storage={ds.storage_dtype} out={args.out_dtype} batch={args.batch_size} buffer={args.buffer_rows}")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for epoch in range(args.epochs):
        reader.set_epoch(epoch)
        t0, rows, checksum = time.perf_counter(), 0, 0.0
        for batch in reader:
            rows += batch.labels.shape[0]
            checksum += float(batch.features[:, 0, 0, 0].sum())  # touch the output
        dt = time.perf_counter() - t0
        mb = rows * ds.feature_size * itemsize / 1e6
        what = "gathered from the resident split" if resident is not None else "read"
        print(f"epoch {epoch}: {rows} rows in {dt:.2f} s: {mb / dt:.0f} MB/s ({ds.storage_dtype} {what}), "
              f"{rows / dt:.0f} rows/s into {args.out_dtype} batches")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB (before reading {rss_before:.0f} MiB); split size "
          f"{ds.split(args.split).num_rows * ds.feature_size * itemsize / 2**20:.0f} MiB in {ds.storage_dtype}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
