"""Whole selection epochs on Ray Train (training + validation + checkpoint) with resident and with
streaming data, against the step-only rates of bench/benchmark.py at the same shapes and threads.

    python bench/benchmark_epoch.py --data DIR                  # 2 CPU workers, 2 epochs per mode
    python bench/benchmark_epoch.py --data DIR --workers 2 --epochs 3 --modes auto off

DIR must be CUB-shaped (C=2048, K=200, 312 attributes; R = H x W) for the step-only comparison, e.g.
`python jobs/prepare_data.py synthetic --name CUB --out DIR` (semi-synthetic, full image count).

Printed per mode and epoch: data wait (share of the training time spent waiting for batches, worst
rank), training images/s, epoch wall time, and the whole-epoch work rate: the epoch's work counted
as docs/performance.md#counting-work does (48 B D C R a training image, 16 a validation image:
a forward pass), over the epoch's wall time, as a share of the step-only work rate of
bench/benchmark.py (DEDN fused, fp32) with each worker's thread count, times the workers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dedn.cli import HelpFormatter

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.

HERE = Path(__file__).resolve().parent


def step_only(r: int, threads: int) -> dict[str, float]:
    """bench/benchmark.py's fused training step and inference forward (s, batch 50) at `threads` threads."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "bench.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, str(HERE / "benchmark.py"), "--r", str(r), "--dtype", "fp32", "--variants",
                        "fused", "infer", "--json", str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["results"]
    return {row["variant"]: row["s_min"] for row in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--data", required=True, help="a CUB-shaped dataset directory")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=2, help="selection epochs per mode (default: %(default)s)")
    ap.add_argument("--modes", nargs="+", default=["auto", "off"], choices=["auto", "host", "off"],
                    help="data.resident modes to run (default: %(default)s)")
    args = ap.parse_args(argv)

    from dedn.config import config_for_dataset  # heavy: after the arguments (see the imports above)
    from dedn.data import FeatureDataset
    from dedn.training.driver import TrainSettings, cpus_per_worker, init_ray, torch_threads, train

    ds = FeatureDataset.open(args.data)
    c, h, w = ds.feature_shape
    init_ray()
    threads = torch_threads(cpus_per_worker(args.workers, False))
    rates = step_only(h * w, threads)
    B = 50
    print(f"{ds}\nstep-only (bench/benchmark.py, fp32, {threads} thread(s)): training step {rates['fused']:.3f} s, "
          f"inference forward {rates['infer']:.3f} s at B={B}; x{args.workers} workers = "
          f"{args.workers * B / rates['fused']:.1f} training img/s", flush=True)
    step_rate = args.workers * B / rates["fused"]  # training images/s, the step-only work rate in image units
    rows = []
    for mode in args.modes:
        cfg = config_for_dataset(ds.name, str(ds.root), "cub").replace(**{
            "protocol": "select", "optim.epochs": args.epochs, "data.resident": mode})
        out = train(cfg, TrainSettings(num_workers=args.workers, track=False, register=False, verbose=True))
        for rep in out.history:
            val_images = ds.split("val_seen").num_rows + ds.split("val_unseen").num_rows
            work = rep.images + val_images / 3  # validation: a forward pass, a third of a training step's work
            rows.append((mode, rep.epoch, rep.data_wait_frac, rep.images_per_s, rep.epoch_time_s,
                         work / rep.epoch_time_s / step_rate, rep.images_per_s / step_rate))
    print(f"\n{'data.resident':>13} {'epoch':>5} {'data wait':>9} {'train img/s':>11} {'epoch s':>8} "
          f"{'train/step-only':>15} {'epoch work/step-only':>20}")
    for mode, ep, wait, ips, secs, eff, train_eff in rows:
        print(f"{mode:>13} {ep:>5d} {100 * wait:>8.1f}% {ips:>11.1f} {secs:>8.1f} {train_eff:>15.0%} {eff:>20.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
