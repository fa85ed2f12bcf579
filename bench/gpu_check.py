"""One-shot device check (`make gpu-check`): what a GPU node does with DEDN, in under 5 minutes.

    python bench/gpu_check.py                 # on a machine with a CUDA GPU
    python bench/gpu_check.py --device cpu --images-per-class 4 --steps 20   # the same path on a CPU (a smoke run)

Prints, in order:
1. the device, and its measured GEMM peaks: fp32, tf32 and bf16 (8192^3 torch.mm on a GPU);
2. DEDN (fused), MSDN and D3GZSL training steps at R = 49 and 196 (D3GZSL: pooled, once) in fp32
   and bf16, with their share of the measured peak (bench/benchmark.py --device);
3. a 1-GPU Ray Train run (protocol select, one epoch) on a generated CUB-sized semi-synthetic dataset
   (the real image count, 2048 x 7 x 7, float16), with resident and with streaming data: training
   images/s, data wait, epoch time and the GPU's peak memory;
4. bf16 against fp32 training from the same initialisation on the same batches: the loss at a few
   steps up to --steps, and the relative gap at the last.
Everything is also written to --out (default $DEDN_HOME/gpu_check/<time>/report.json) with the
console text beside it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from dedn.accel import fast_bf16, gemm_rate
from dedn.cli import HelpFormatter
from dedn.config import config_for_dataset
from dedn.data import FeatureDataset
from dedn.data.reader import ShardReader
from dedn.data.synthetic import write_synthetic
from dedn.families import family_of
from dedn.families.base import StepContext
from dedn.home import dedn_home
from dedn.protocol import ClassProtocol
from dedn.training.driver import TrainSettings, train
from dedn.training.loop import build_model

HERE = Path(__file__).resolve().parent


def say(line: str = "") -> None:
    print(line, flush=True)


def gemm_peaks(device: str) -> dict[str, float]:
    n = 8192 if device.startswith("cuda") else 2048
    dtypes = ["fp32"] + (["tf32"] if device.startswith("cuda") else []) + (["bf16"] if fast_bf16(device)[0] else [])
    return {dt: gemm_rate(dt, n=n, reps=10 if device.startswith("cuda") else 2, device=device) for dt in dtypes}


def step_times(device: str, dtypes: list[str], out: Path) -> None:
    cmd = [sys.executable, str(HERE / "benchmark.py"), "--quick", "--device", device, "--r", "49", "196",
           "--dtype", *dtypes, "--variants", "fused", "msdn", "d3gzsl", "--json", str(out)]
    subprocess.run(cmd, check=True)


def ray_runs(data: str, device: str, out: dict) -> None:
    ds = FeatureDataset.open(data)
    gpu = device.startswith("cuda")
    for mode in ("auto", "off"):
        cfg = config_for_dataset(ds.name, data, "cub").replace(**{"protocol": "select", "optim.epochs": 1,
                                                                   "data.resident": mode})
        t0 = time.perf_counter()
        res = train(cfg, TrainSettings(num_workers=1, use_gpu=gpu, track=False, register=False, verbose=True))
        rep = res.history[-1]
        row = {"data.resident": mode, "images_per_s": rep.images_per_s, "data_wait_frac": rep.data_wait_frac,
               "epoch_s": rep.epoch_time_s, "train_s": rep.seconds, "wall_s": time.perf_counter() - t0,
               "worker_peak_rss_mib": rep.peak_rss_mib, "resident_mib": rep.resident_mib,
               "worker_peak_gpu_mib": rep.gpu_peak_mib}
        out.setdefault("ray_train", []).append(row)
        say(f"  data.resident={mode:4s}: {rep.images_per_s:8.0f} img/s training, data wait "
            f"{100 * rep.data_wait_frac:5.1f}%, epoch {rep.epoch_time_s:6.1f} s (training {rep.seconds:.1f} s), "
            f"resident {rep.resident_mib:,.0f} MiB, worker peak RSS {rep.peak_rss_mib:,.0f} MiB"
            + (f", GPU peak {rep.gpu_peak_mib:,.0f} MiB" if gpu else ""))


def bf16_agreement(data: str, device: str, steps: int, out: dict) -> None:
    """fp32 and bf16 autocast training of DEDN from one init on the same batches (resident reader)."""
    ds = FeatureDataset.open(data)
    cfg = config_for_dataset(ds.name, data, "cub")
    dev = torch.device(device)
    res = ShardReader(ds, "train", batch_size=1, shuffle=False).decode().to(dev)
    protocol = ClassProtocol.for_phase("select", ds.class_side)
    family = family_of(cfg)
    marks = sorted({1, max(1, steps // 4), max(1, steps // 2), steps})
    curves: dict[str, dict[int, float]] = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = build_model(cfg, ds.class_side, ds.feature_shape).to(dev)
        opts = family.optimizers(cfg, model)
        ctx = StepContext(cfg=cfg, protocol=protocol, optimizers=opts, device=dev, autocast_dtype=dtype, epoch=1)
        reader = ShardReader(ds, "train", batch_size=cfg.optim.batch_size, seed=0, buffer_rows=2048,
                             class_balanced=cfg.data.class_balanced, resident=res, out_dtype=res.features.dtype)
        step, epoch, curve = 0, 1, {}
        model.train()
        while step < steps:
            reader.set_epoch(epoch)
            for b in reader:
                step += 1
                ctx.step = step
                parts = family.train_step(model, b.features.to(dev, torch.float32), b.labels.to(dev), ctx)
                if step in marks:
                    curve[step] = parts["loss"]
                if step == steps:
                    break
            epoch += 1
        curves[name] = curve
    out["bf16_vs_fp32"] = {"steps": marks, "fp32": [curves["fp32"][s] for s in marks],
                           "bf16": [curves["bf16"][s] for s in marks]}
    for s in marks:
        a, b = curves["fp32"][s], curves["bf16"][s]
        say(f"  step {s:4d}: loss fp32 {a:9.4f}  bf16 {b:9.4f}  relative gap {abs(b - a) / abs(a):.2%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--data", help="an existing CUB-shaped dataset directory (default: generate one)")
    ap.add_argument("--images-per-class", type=int, default=0,
                    help="cap per class and split for the generated dataset (default: all, the real image count)")
    ap.add_argument("--steps", type=int, default=300, help="steps of the bf16/fp32 comparison (default: %(default)s)")
    ap.add_argument("--skip-steps", action="store_true", help="skip part 2 (the step-time table)")
    ap.add_argument("--out", help="folder for report.json (default: $DEDN_HOME/gpu_check/<time>)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); this check has not run. "
              "Use --device cpu for a smoke run of the same path.", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    folder = Path(args.out) if args.out else dedn_home() / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "torch": torch.__version__}
    log = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            sys.__stdout__.write(s)
            log.write(s)
            return len(s)

        def flush(self) -> None:
            sys.__stdout__.flush()

    with redirect_stdout(Tee()):
        name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"CPU {torch.backends.cpu.get_cpu_capability()}"
        ok, why = fast_bf16(args.device)
        say(f"== 1. device: {name}; torch {torch.__version__}; bf16: {why}")
        report["gemm_gflop_s"] = peaks = gemm_peaks(args.device)
        say("   GEMM peaks: " + ", ".join(f"{k} {v / 1000:.1f} TFLOP/s" for k, v in peaks.items()))
        if not args.skip_steps:
            say("== 2. training steps (bench/benchmark.py): share of the peak measured there")
            sys.stdout.flush()
            dtypes = ["fp32"] + (["bf16"] if ok else [])
            step_times(args.device, dtypes, folder / "steps.json")
            report["steps"] = json.loads((folder / "steps.json").read_text())
        with tempfile.TemporaryDirectory(prefix="dedn-gpu-check-") as tmp:
            data = args.data
            if data is None:
                t0 = time.perf_counter()
                data = str(write_synthetic(Path(tmp) / "cub", "CUB", progress=False,
                                           **({"images_per_class": args.images_per_class}
                                              if args.images_per_class else {})))
                say(f"   generated a CUB-sized semi-synthetic dataset in {time.perf_counter() - t0:.0f} s")
            say("== 3. Ray Train, 1 worker, one selection epoch: resident vs streaming data")
            ray_runs(data, args.device, report)
            say(f"== 4. bf16 vs fp32: DEDN from one initialisation on the same batches, {args.steps} steps")
            bf16_agreement(data, args.device, args.steps, report) if ok else say(f"   skipped: {why}")
        say(f"== done in {time.perf_counter() - t_start:.0f} s; report in {folder}")
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "console.txt").write_text(log.getvalue())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
