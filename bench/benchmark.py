"""Training-step and inference throughput of DEDN (and MSDN) at CUB shapes, against the machine's GEMM rate.

    python bench/benchmark.py --quick                     # all configurations, few repetitions
    python bench/benchmark.py --r 49 --dtype fp32 bf16    # a subset
    python bench/benchmark.py --variants msdn msdn_infer  # MSDN's training step and inference
    python bench/benchmark.py --variants d3gzsl d3gzsl_ref d3gzsl_base --r 1   # D3GZSL iterations

Shapes: B=50, C=2048, D=312, G=300, K=200 (150 seen / 50 unseen), Q=6 with CUB's manual
cluster sizes 112/87/24/40/15/34, R=49 (7x7) and/or R=196 (14x14). Random features.
A training step = forward + dedn_loss + backward + RMSprop step.

Work is counted as docs/performance.md#counting-work says: FLOP/step = 48 B D C R for both
experts (24 B D C R for one expert), so "GFLOP/s" and "of GEMM" mean the same in every report.
MSDN (dedn/families/msdn/model.py): four (D x C) @ (C x R) products per sample, 24 B D C R per
training step (docs/msdn.md#work-per-step).
D3GZSL (dedn/families/d3gzsl): one training iteration at the authors' CUB settings = 5 critic
steps + 1 generator step, B = 256 pooled 2048-d features, 312-d attributes, 250 synthetic rows
for the D3 terms (5 per unseen class); d3gzsl = the default variant, d3gzsl_ref = the reference
variant, d3gzsl_base = d3.enabled=false (the WGAN-GP base). Its rate is judged by
../shared/docs/d3gzsl.md §9's count of the iteration (GEMM FLOP only: 441.5 GFLOP with D3, 301.0
without); the GEMM work torch.utils.flop_counter measures in our iteration is printed beside it
(less: the gradient penalty's input gradient is taken in closed form, over the feature columns
and the interpolated rows only). It has no region count: it runs once per dtype.
The GEMM rate is measured in the same run (4096^3 torch.mm), for the requested dtypes only. bf16
rows run only where the device multiplies bf16 natively (dedn.accel.fast_bf16: AVX512_BF16/AMX on
a CPU, compute capability >= 8.0 on a GPU); elsewhere they are skipped with a message (an AVX2
CPU runs a bf16 matmul ~100x slower than fp32). tf32 (GPU only): fp32 tensors, TF32 matmuls.
--device cuda times the same steps on a GPU (synchronised; peak MiB = torch.cuda.max_memory_allocated
increase); --compile wraps the model in torch.compile (the time to compile is excluded: warm-up).

Peak memory: each configuration runs in its own subprocess; "peak MiB" is the increase of
the process's resource.getrusage(RUSAGE_SELF).ru_maxrss over its resident size after the
model, optimiser and inputs are built and before the first (warm-up) step, i.e. the extra
memory training steps need on top of the model and its inputs (including the RMSprop state
and gradients, ~2 x 4 bytes per parameter, created by the first step).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dedn.accel import fast_bf16, gemm_rate, set_tf32
from dedn.atomic import write_text
from dedn.cli import HelpFormatter
from dedn.config import RunConfig, build_config
from dedn.families import get_family
from dedn.families.base import StepContext
from dedn.families.d3gzsl.model import D3GZSL
from dedn.families.dedn.model import DEDN
from dedn.families.msdn.model import MSDN
from dedn.protocol import ClassProtocol

B, C, D, G, K = 50, 2048, 312, 300, 200
# ../shared/docs/d3gzsl.md §9: GEMM GFLOP of one gzsl/ iteration at CUB settings (5 x 55.1 + 25.4, plus D3's
# 5 x 20.3 + 39.0); ours does the same arithmetic with less GEMM work (the penalty's closed-form input gradient)
D3_NOTE_GFLOP = {"d3gzsl": 441.5, "d3gzsl_ref": 441.5, "d3gzsl_base": 301.0}
CUB_CLUSTER_SIZES = (112, 87, 24, 40, 15, 34)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_config(cfg: dict) -> dict:
    """One configuration in this process: returns seconds/step (min, median) and memory."""
    torch.manual_seed(0)
    dev = cfg.get("device", "cpu")
    set_tf32(cfg["dtype"] == "tf32")
    r = cfg["r"]
    h = int(round(r**0.5))
    perm = torch.randperm(D).tolist()  # the sizes matter for speed, not which attributes
    clusters, s = [], 0
    for n in CUB_CLUSTER_SIZES:
        clusters.append(perm[s : s + n])
        s += n
    if cfg["variant"].startswith("msdn"):
        run_cfg = build_config("cub", ["model=msdn"])  # the authors' CUB objective (families/msdn/presets/cub.yaml)
        model = MSDN(run_cfg.model, word_vectors=torch.randn(D, G), class_attributes=torch.rand(K, D), feature_shape=(C, h, h))
    else:
        run_cfg = RunConfig.for_family("dedn").replace(**{"model.experts": cfg["experts"]})
        model = DEDN(run_cfg.model, word_vectors=torch.randn(D, G), class_attributes=torch.rand(K, D), clusters=clusters,
                     feature_shape=(C, h, h), impl=cfg["impl"])
    family = get_family(run_cfg.model.name)
    model = model.to(dev)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4, alpha=0.99)
    protocol = ClassProtocol(tuple(range(150)), tuple(range(150, K)), K)
    x = torch.rand(B, C, h, h, device=dev)
    y = torch.randint(0, 150, (B,), device=dev)
    bf16 = cfg["dtype"] == "bf16"
    run = torch.compile(model) if cfg.get("compile") else model
    kind = torch.device(dev).type

    def train_step() -> None:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            out = run(x)
            loss = family.loss(out, y, protocol, run_cfg)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            family.combine(run_cfg, family.score_parts(run(x)))
        _sync(dev)

    return {**cfg, **_timed(train_step if cfg["mode"] == "train" else infer_step, cfg["reps"], device=dev)}


def _timed(step, reps: int, counted=None, device: str = "cpu") -> dict:
    """A warm-up call (allocator, oneDNN kernels, optimiser state), then `reps` timed calls of `step`:
    {s_min, s_med, peak_mib}; `counted` (a context manager) wraps one extra untimed call after the warm-up."""
    cuda = device.startswith("cuda")
    base = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step()
    if counted is not None:
        with counted:
            step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mib()
    return {"s_min": times[0], "s_med": times[len(times) // 2], "peak_mib": peak - base}


def run_d3(cfg: dict) -> dict:
    """One D3GZSL iteration (5 critic + 1 generator step) in this process: seconds, memory, counted GFLOP."""
    torch.manual_seed(0)
    dev = cfg.get("device", "cpu")
    over = ["model=d3gzsl"] + (["variant=reference"] if cfg["variant"] == "d3gzsl_ref" else []) + (
        ["d3.enabled=false"] if cfg["variant"] == "d3gzsl_base" else [])
    run_cfg = build_config("cub", over).replace(**{"protocol": "final"})
    family = get_family("d3gzsl")
    protocol = ClassProtocol(tuple(range(150)), tuple(range(150, K)), K)
    model = D3GZSL(run_cfg.model, class_attributes=torch.nn.functional.normalize(torch.rand(K, D), dim=1),
                   feature_shape=(C, 1, 1), seen=protocol.seen, unseen=protocol.unseen).to(dev)
    opts = family.optimizers(run_cfg, model)
    train = family.wrap(model, lambda m: m).train()
    bsz = run_cfg.optim.batch_size
    x = torch.rand(bsz, C, 1, 1, device=dev)
    y = torch.randint(0, 150, (bsz,), device=dev)
    ctx = StepContext(cfg=run_cfg, protocol=protocol, optimizers=opts, device=torch.device(dev),
                      autocast_dtype=torch.bfloat16 if cfg["dtype"] == "bf16" else None, epoch=1)
    n = run_cfg.loss.n_critic

    def iteration() -> None:
        for s in range(1, n + 1):
            ctx.step = s
            family.train_step(train, x, y, ctx)
        _sync(dev)

    counter = FlopCounterMode(display=False)
    return {**cfg, **_timed(iteration, cfg["reps"], counted=counter, device=dev), "flop": counter.get_total_flops(),
            "batch": bsz}


def _spawn(cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--_worker", json.dumps(cfg)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {cfg}:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed repetitions instead of 5")
    ap.add_argument("--r", type=int, nargs="+", default=[49, 196], help="region counts (perfect squares)")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16"],
                    help="tf32: GPU only (fp32 tensors, TF32 matmuls)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DEDN/MSDN model (not D3GZSL)")
    ap.add_argument("--variants", nargs="+",
                    default=["fused", "loop", "coarse", "fine", "infer", "msdn", "d3gzsl", "d3gzsl_ref", "d3gzsl_base"],
                    choices=["fused", "loop", "direct", "coarse", "fine", "infer", "msdn", "msdn_infer", "d3gzsl",
                             "d3gzsl_ref", "d3gzsl_base"],
                    help="fused=both experts fused; loop=per-sub-network loop; direct=paper form per sub-network; "
                    "coarse/fine=one expert (fused); infer=forward only; msdn/msdn_infer=MSDN training step/forward; "
                    "d3gzsl/d3gzsl_ref/d3gzsl_base: one D3GZSL iteration (default/reference variant/no D3)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        job = json.loads(args._worker)
        print(json.dumps(run_d3(job) if job["variant"].startswith("d3gzsl") else run_config(job)))
        return 0
    for r in args.r:
        if int(round(r**0.5)) ** 2 != r:
            ap.error(f"--r: expected perfect squares, found {r}")

    reps = 2 if args.quick else 5
    dev = args.device
    ok, why = fast_bf16(dev)
    dtypes = list(dict.fromkeys(args.dtype))
    if "bf16" in dtypes and not ok:
        print(f"bf16 rows skipped: {why}", flush=True)
        dtypes.remove("bf16")
    if "tf32" in dtypes and not dev.startswith("cuda"):
        print("tf32 rows skipped: TF32 is a GPU matmul mode", flush=True)
        dtypes.remove("tf32")
    if not dtypes:
        ap.error("no requested dtype runs on this device")
    where = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else \
        f"CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; B={B} C={C} D={D} G={G} K={K} "
          f"Q=6 {CUB_CLUSTER_SIZES}{'; torch.compile' if args.compile else ''}", flush=True)
    rate = {dt: gemm_rate(dt, device=dev) for dt in dtypes}
    print("GEMM rate (best torch.mm, 8192^3 on a GPU, 4096^3 on a CPU): " + ", ".join(f"{dt} {v:.0f} GFLOP/s" for dt, v in rate.items()), flush=True)
    hdr = f"{'R':>4} {'dtype':>5} {'config':>8} {'s/step':>8} {'img/s':>7} {'GFLOP/s':>8} {'of GEMM':>8} {'peak MiB':>9}"
    print(hdr)
    print("-" * len(hdr))
    results = []
    for i, r in enumerate(args.r):
        for dt in dtypes:
            for v in args.variants:
                if v.startswith("d3gzsl"):
                    if i > 0:  # no region count: once per dtype
                        continue
                    res = _spawn({"r": 1, "dtype": dt, "variant": v, "reps": reps, "device": dev})
                    note = D3_NOTE_GFLOP[v]  # the note's count of this iteration (what the rate is judged by)
                    gfs = note / res["s_min"]
                    res.update(gflop=note, gflop_counted=res["flop"] / 1e9, gflop_s=gfs, of_gemm=gfs / rate[dt],
                               images_s=res["batch"] * 5 / res["s_min"])
                    results.append(res)
                    print(f"{'-':>4} {dt:>5} {v[:11]:>11} {res['s_min']:>8.3f} {res['images_s']:>7.1f} {gfs:>8.1f} "
                          f"{res['of_gemm']:>7.0%} {res['peak_mib']:>9.0f}   (note: {note:.1f} GFLOP/iteration; "
                          f"counted here: {res['gflop_counted']:.1f})", flush=True)
                    continue
                cfg = {
                    "r": r, "dtype": dt, "variant": v, "reps": reps,
                    "impl": v if v in ("loop", "direct") else "fused",
                    "experts": v if v in ("coarse", "fine") else "both",
                    "mode": "infer" if v.endswith("infer") else "train", "device": dev, "compile": args.compile,
                }
                res = _spawn(cfg)
                passes = 1 if v.endswith("infer") else 3  # a training step counts as three forward passes
                experts = 1 if v in ("coarse", "fine", "msdn", "msdn_infer") else 2  # MSDN's work = one DEDN expert
                flop = 8 * passes * experts * B * D * C * r  # = 48 B D C R for a full DEDN training step
                gfs = flop / res["s_min"] / 1e9
                res.update(gflop=flop / 1e9, gflop_s=gfs, of_gemm=gfs / rate[dt], images_s=B / res["s_min"])
                results.append(res)
                print(f"{r:>4} {dt:>5} {v:>8} {res['s_min']:>8.3f} {res['images_s']:>7.1f} {gfs:>8.1f} "
                      f"{res['of_gemm']:>7.0%} {res['peak_mib']:>9.0f}", flush=True)
    print("s/step: fastest of the timed repetitions; GFLOP/s from 48 B D C R per training step "
          "(24 for one expert, 16 per inference forward); peak MiB: ru_maxrss increase during the steps.")
    if any(v.startswith("d3gzsl") for v in args.variants):
        print("d3gzsl rows: s/step is one iteration (5 critic + 1 generator step), img/s counts the 5 real batches, "
              "GFLOP/s and of GEMM by the note's count of the iteration; 'counted here' is the GEMM work "
              "torch.utils.flop_counter measures in ours.")
    if args.json:
        write_text(args.json, json.dumps({"gemm_gflop_s": rate, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
