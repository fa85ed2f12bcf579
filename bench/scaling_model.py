"""The scaling model of docs/scaling.md: per-GPU step, ingest, all-reduce, predicted efficiency.

    python bench/scaling_model.py                           # GPUs: 1-64 over 1-8 nodes, from the defaults
    python bench/scaling_model.py --step-ms 1.0 --batch 50  # your measured step (e.g. from make gpu-check)
    python bench/scaling_model.py --gpu-report ~/.dedn/gpu_check/<time>/report.json
    python bench/scaling_model.py --cpu-check               # measure this CPU: 1- and 2-worker prediction

Model (per step, W = N nodes x G GPUs, every GPU a DDP rank with --batch images):
  compute      t_c: the step time of one GPU (default 1 ms: 75 GFLOP = 48 B D C R at CUB shapes, R=49,
               at ~75 TFLOP/s of bf16 — replace it by the device check's figure);
  all-reduce   S bytes of gradients (9.6 M parameters: 38.4 MB fp32, 19.2 MB with bf16 compression),
               hierarchical: 2 (G-1)/G S / B_nvlink inside a node, then 2 (N-1)/N S / B_net between nodes
               (one NIC per node, 100 or 400 Gb/s);
  overlap      DDP all-reduces each bucket while the backward pass goes on (2/3 of t_c); what is
               left after it, and at least the last bucket (--bucket-mb), is exposed;
  ingest       each GPU needs batch x image bytes per t_c (float16 2048x7x7: 200 KB an image); the
               data path delivers: streaming Parquet ~0.4 GB/s a process, resident host memory
               ~4 GB/s gather + the host-to-device copy, resident device memory: not a limit;
  efficiency   t_c / (t_c + exposed all-reduce + data stall), the rate per GPU against one GPU alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dedn.cli import HelpFormatter

HERE = Path(__file__).resolve().parent
PARAMS = 9.6e6  # DEDN at CUB shapes (dedn.families.dedn: two experts, 6 fine sub-networks)
IMAGE_BYTES = 2048 * 49 * 2  # float16 2048x7x7
DATA_RATE = {"stream": 0.4e9, "host": 4e9, "device": math.inf}  # bytes/s a process delivers (measured, see docs)


def allreduce_s(nbytes: float, nodes: int, gpus: int, nvlink_gbs: float, net_gbit: float) -> float:
    intra = 2 * (gpus - 1) / gpus * nbytes / (nvlink_gbs * 1e9) if gpus > 1 else 0.0
    inter = 2 * (nodes - 1) / nodes * nbytes / (net_gbit / 8 * 1e9) if nodes > 1 else 0.0
    return intra + inter


def efficiency(t_c: float, batch: int, nodes: int, gpus: int, net_gbit: float, grad_bytes: float, data: str,
               nvlink_gbs: float, bucket_mb: float, h2d_gbs: float) -> tuple[float, float, float]:
    """(efficiency, exposed all-reduce s, data stall s) of one step."""
    t_ar = allreduce_s(grad_bytes, nodes, gpus, nvlink_gbs, net_gbit)
    last = allreduce_s(min(grad_bytes, bucket_mb * 1e6), nodes, gpus, nvlink_gbs, net_gbit)
    exposed = max(t_ar - 2 / 3 * t_c, last) if t_ar > 0 else 0.0
    need = batch * IMAGE_BYTES
    t_data = need / DATA_RATE[data] + (need / (h2d_gbs * 1e9) if data != "device" else 0.0)
    stall = max(0.0, t_data - t_c)  # the reader works ahead on its own thread: only the excess stalls
    return t_c / (t_c + exposed + stall), exposed, stall


def gpu_table(args: argparse.Namespace) -> None:
    t_c = args.step_ms / 1e3
    need = args.batch * IMAGE_BYTES / t_c
    print(f"per-GPU step t_c = {args.step_ms:.2f} ms at batch {args.batch}: {args.batch / t_c:,.0f} img/s, "
          f"ingest needed {need / 1e9:.1f} GB/s of float16 2048x7x7 per GPU")
    print(f"data path delivers per process: streaming {DATA_RATE['stream'] / 1e9:.1f} GB/s, resident host "
          f"{DATA_RATE['host'] / 1e9:.0f} GB/s (+ host-to-device {args.h2d_gbs:.0f} GB/s), resident device: HBM")
    for grad, nbytes in (("fp32", PARAMS * 4), ("bf16", PARAMS * 2)):
        for gbit in (100, 400):
            t1 = allreduce_s(nbytes, 2, 1, args.nvlink_gbs, gbit)
            print(f"all-reduce of {nbytes / 1e6:.1f} MB ({grad} gradients) between 2 nodes at {gbit} Gb/s: "
                  f"{t1 * 1e3:.2f} ms")
    layouts = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8)]
    print(f"\npredicted scaling efficiency (rate per GPU against one GPU), per-GPU batch {args.batch}")
    head = f"{'GPUs':>5} {'nodes':>5} " + " ".join(f"{f'{d} {g} {n}G':>17}" for d in ("device", "host")
                                                   for g in ("fp32", "bf16") for n in (100, 400))
    print(head)
    print(" " * 12 + "(data path, gradient dtype, network Gb/s)")
    for nodes, gpus in layouts:
        row = []
        for d in ("device", "host"):
            for _dtype, nbytes in (("fp32", PARAMS * 4), ("bf16", PARAMS * 2)):
                for n in (100, 400):
                    e, _, _ = efficiency(t_c, args.batch, nodes, gpus, n, nbytes, d, args.nvlink_gbs, args.bucket_mb,
                                         args.h2d_gbs)
                    row.append(f"{e:>17.0%}")
        print(f"{nodes * gpus:>5} {nodes:>5} " + " ".join(row))
    e_stream, _, stall = efficiency(t_c, args.batch, 1, 1, 100, 0, "stream", args.nvlink_gbs, args.bucket_mb,
                                    args.h2d_gbs)
    print(f"\nstreaming Parquet on one GPU: efficiency {e_stream:.0%} (data stall {stall * 1e3:.1f} ms a step): "
          "the reader, not the GPU, sets the pace")


# ---- CPU check: the same model on this machine's measured numbers ---------------------------------
def _gloo_allreduce_s(nbytes: int, world: int = 2) -> float:
    code = f"""
import os, sys, time, torch, torch.distributed as dist
rank = int(sys.argv[1]); torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{{port}}", rank=rank, world_size={world})
t = torch.ones({nbytes // 4}); dist.all_reduce(t); ts = []
for _ in range(5):
    dist.barrier(); s = time.perf_counter(); dist.all_reduce(t); ts.append(time.perf_counter() - s)
if rank == 0: print(sorted(ts)[2])
dist.destroy_process_group()
"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = code.replace("{port}", str(port))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    out = [p.communicate()[0] for p in procs]
    return float(out[0].strip())


def cpu_check() -> None:
    with tempfile.TemporaryDirectory() as d:
        res = Path(d) / "b.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, str(HERE / "benchmark.py"), "--r", "49", "--dtype", "fp32", "--variants",
                        "fused", "--json", str(res)], check=True, env=env, stdout=subprocess.DEVNULL)
        t_c = json.loads(res.read_text())["results"][0]["s_min"]
    t_ar = _gloo_allreduce_s(int(PARAMS * 4))
    b = 50
    print(f"this CPU: DEDN training step (B={b}, R=49, fp32, 1 thread) t_c = {t_c:.3f} s; gloo all-reduce of "
          f"{PARAMS * 4 / 1e6:.1f} MB between 2 local processes t_ar = {t_ar:.3f} s")
    print("CPU model: the all-reduce needs the same cores as the backward pass (gloo copies and sums on the CPU), "
          "so nothing overlaps: step = t_c + t_ar")
    print(f"predicted training rate: 1 worker {b / t_c:.1f} img/s; 2 workers {2 * b / (t_c + t_ar):.1f} img/s "
          f"(efficiency {t_c / (t_c + t_ar):.0%})")
    print("compare: python bench/benchmark_epoch.py --data DIR --workers 1 (and --workers 2), column train img/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--step-ms", type=float, default=1.0, help="per-GPU step time, ms (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=50, help="per-GPU batch (default: %(default)s)")
    ap.add_argument("--gpu-report", help="a make gpu-check report.json: take the bf16 DEDN step at R=49 from it")
    ap.add_argument("--nvlink-gbs", type=float, default=300.0, help="intra-node GB/s per GPU (default: %(default)s)")
    ap.add_argument("--h2d-gbs", type=float, default=20.0, help="host-to-device GB/s (default: %(default)s)")
    ap.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket, MB (default: %(default)s)")
    ap.add_argument("--cpu-check", action="store_true", help="measure this CPU and predict 1 and 2 workers")
    args = ap.parse_args(argv)
    if args.cpu_check:
        cpu_check()
        return 0
    if args.gpu_report:
        rows = json.loads(Path(args.gpu_report).read_text())["steps"]["results"]
        row = next(r for r in rows if r["variant"] == "fused" and r["r"] == 49 and r["dtype"] == "bf16")
        args.step_ms = row["s_min"] * 1e3
    gpu_table(args)
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    raise SystemExit(main())
