"""Node memory of a concurrent sweep with the node-shared decoded copy and without it.

    python bench/benchmark_sweep_memory.py --data DIR            # 4 trials, 4 at a time, 1 epoch each

Runs `tuning/tune.py` twice on DIR (data.resident=host; data.resident_shared=true, then false), each
trial a short selection epoch (optim.max_steps_per_epoch=2, then a full validation), with all
trials at once on this node, and samples the node's used memory (MemTotal - MemAvailable, which
counts Ray's object store in /dev/shm) every 0.2 s. Prints the peak over the baseline before
the sweep started, and the decoded size of the splits each trial holds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from dedn.cli import HelpFormatter

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.

HERE = Path(__file__).resolve().parent


def used_mib() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            info[k] = int(v.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def run(data: str, shared: bool, trials: int, storage: str) -> tuple[float, float]:
    base = used_mib()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], used_mib())
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    cmd = [sys.executable, str(HERE.parent / "tuning" / "tune.py"), "--data", data, "--num-samples", str(trials),
           "--max-concurrent-trials", str(trials), "--cpus-per-trial", str(round(max(0.25, (os.cpu_count() or 2) / trials), 2)),
           "--storage", storage, "--name", f"mem-{'shared' if shared else 'own'}", "epochs=1",
           "optim.max_steps_per_epoch=2", "data.resident=host", f"data.resident_shared={str(shared).lower()}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stop.set()
    t.join()
    return peak[0] - base, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--data", required=True, help="dataset directory the trials read (e.g. a full-size CUB set)")
    ap.add_argument("--trials", type=int, default=4, help="trials, all at once (default: %(default)s)")
    args = ap.parse_args(argv)
    from dedn.data import FeatureDataset  # heavy: after the arguments (see the imports above)
    from dedn.data.resident import split_nbytes

    ds = FeatureDataset.open(args.data)
    held = sum(split_nbytes(ds, s) for s in ("train", "val_seen", "val_unseen")) / 2**20
    print(f"{ds}\neach trial holds train + val_seen + val_unseen decoded: {held:,.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory(prefix="dedn-sweep-mem-") as tmp:
        os.environ.setdefault("DEDN_HOME", tmp)
        for shared in (True, False):
            peak, secs = run(str(ds.root), shared, args.trials, tmp)
            print(f"data.resident_shared={str(shared).lower():5s}: {args.trials} concurrent trials, node memory peak "
                  f"+{peak:,.0f} MiB over the baseline ({secs:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
