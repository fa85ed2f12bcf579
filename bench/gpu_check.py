"""One-shot device check (`make gpu-check`): what a GPU node does with DEDN, in under 8 minutes.

    PYTHONPATH=. python bench/gpu_check.py --out DIR     # on a CUDA node, from a plain checkout
    PYTHONPATH=. python bench/gpu_check.py --device cpu --images-per-class 1 --hw 2 --steps 5 --skip-steps \
        --pack-steps 3 --out DIR                          # a CPU smoke run of every part: about 20 s

Needs torch, numpy, pyarrow and scipy only: no Ray, MLflow or Optuna, no installed project (a
bare GPU node has none of them). Parts, in order:
1. the device, and its measured GEMM peaks: fp32, tf32 and bf16 (8192^3 torch.mm on a GPU);
2. DEDN (fused), MSDN and D3GZSL training steps at R = 49 and 196 (D3GZSL: pooled, once) in fp32
   and bf16, with their share of the measured peak (bench/benchmark.py --device); on a GPU, which
   of torch's attention kernels (flash, memory-efficient, math) take the channel attention;
3. the training loop as a Ray Train worker runs it (`run_phase`, the network under the same DDP
   wrapper, the loop's collectives) in a torch.distributed group of world size 1 (NCCL on a GPU,
   gloo on a CPU), without Ray: one selection epoch on a generated CUB-shaped semi-synthetic
   dataset at 2048 x 14 x 14 (float16 shards), held in device memory and streamed from the shards:
   training images/s, data wait, whole epoch against training only, against the step-only rate of
   part 2, and the GPU's peak memory;
   then 1, 2 and 4 training loops at once on the device (separate processes, as fractional-GPU
   sweep trials run): images/s in total and per loop;
4. bf16 against fp32 training from the same initialisation on the same batches: the loss at a few
   steps up to --steps, and the relative gap at the last;
5. feature extraction (`prepare_data.py from-images`): ResNet-101's trunk (`dedn/nn/resnet.py`) at
   448 x 448 in fp32 and bf16, images/s; image decoding + preprocessing per CPU core and on all the
   node's cores, and whether the CPU side keeps the backbone at least 80 % busy; where torchvision
   imports, the maximum difference of our preprocessing + trunk against the authors' torchvision
   pipeline on the same random weights.
`report.json` and `console.txt` are written to --out (default $DEDN_HOME/gpu_check/<time>) after
every part; a part that fails is recorded there with its traceback and the next part runs (exit 1).
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
import traceback
from contextlib import redirect_stdout
from pathlib import Path

import torch

from dedn.accel import autocast_dtype_for, fast_bf16, gemm_rate
from dedn.atomic import write_text
from dedn.cli import HelpFormatter
from dedn.config import config_for_dataset
from dedn.data import FeatureDataset
from dedn.data.reader import ShardReader
from dedn.data.resident import decode_split
from dedn.data.synthetic import write_synthetic
from dedn.families import family_of
from dedn.families.base import StepContext
from dedn.families.capabilities import training_module
from dedn.home import dedn_home
from dedn.protocol import ClassProtocol
from dedn.training.ddp import TorchCollective, ddp, single_process_group
from dedn.training.loop import build_model, run_phase

HERE = Path(__file__).resolve().parent


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as Ray and a container see them)."""
    return len(os.sched_getaffinity(0))


def say(line: str = "") -> None:
    print(line, flush=True)


def gemm_peaks(device: str) -> dict[str, float]:
    cuda = device.startswith("cuda")
    dtypes = ["fp32"] + (["tf32"] if cuda else []) + (["bf16"] if fast_bf16(device)[0] else [])
    # a GPU: gemm_rate's own 8192^3 with warm-ups; a CPU dry run: small and quick
    return {dt: gemm_rate(dt, n=None if cuda else 2048, reps=None if cuda else 2, device=device) for dt in dtypes}


def step_times(device: str, dtypes: list[str], out: Path) -> None:
    cmd = [sys.executable, str(HERE / "benchmark.py"), "--quick", "--device", device, "--r", "49", "196",
           "--dtype", *dtypes, "--variants", "fused", "msdn", "d3gzsl", "--json", str(out)]
    subprocess.run(cmd, check=True)


def sdpa_backends(device: str, out: dict) -> None:
    """Which of torch's attention kernels take DEDN's channel attention at CUB shapes (B 50, N 312
    attribute rows, C 2048 channels, R 196 and 49), per dtype: the math kernel builds the (B, N, C)
    matrix, the fused ones do not (../shared/docs/gpu-readiness.md #5)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dedn.nn.attention import channel_branch_sdpa

    dev = torch.device(device)
    rows = []
    for r in (196, 49):
        for dtype in (torch.float32, torch.bfloat16):
            m3, m4 = torch.randn(312, r, device=dev, dtype=dtype), torch.randn(312, r, device=dev, dtype=dtype)
            f = torch.randn(50, 2048, r, device=dev, dtype=dtype)
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
                try:
                    with sdpa_kernel([backend]):
                        channel_branch_sdpa(m3, m4, f)
                    ok = True
                except RuntimeError:
                    ok = False
                rows.append({"R": r, "dtype": str(dtype).replace("torch.", ""), "backend": backend.name, "ok": ok})
    out["sdpa_backends"] = rows
    for r in (196, 49):
        for dt in ("float32", "bfloat16"):
            took = [x["backend"] for x in rows if x["R"] == r and x["dtype"] == dt and x["ok"]]
            say(f"   R={r:3d} {dt:8s}: {', '.join(took) or 'none'}")


def step_only_rate(steps: dict | None, r: int, dtype: torch.dtype | None) -> float | None:
    """Images/s of the bare DEDN (fused) training step at this R and precision in part 2, if it ran."""
    want = "bf16" if dtype == torch.bfloat16 else "fp32"
    for row in (steps or {}).get("results", []):
        if row.get("variant") == "fused" and row.get("r") == r and row.get("dtype") == want:
            return float(row["images_s"])
    return None


def loop_runs(data: str, device: str, out: dict) -> None:
    """One selection epoch of `run_phase` (the code every Ray Train worker runs) under DDP at world size 1."""
    ds = FeatureDataset.open(data)
    dev = torch.device(device)
    held = "device" if dev.type == "cuda" else "host"
    with single_process_group(dev) as backend:
        out["loop_backend"] = backend
        for mode in (held, "off"):
            cfg = config_for_dataset(ds.name, data, "cub").replace(**{"protocol": "select", "optim.epochs": 1,
                                                                       "data.resident": mode})
            family = family_of(cfg)
            dtype = autocast_dtype_for(cfg.train.precision, dev)

            def wrap(model: torch.nn.Module, cfg=cfg, family=family) -> torch.nn.Module:
                return training_module(family, model, lambda net: ddp(net, cfg, dev))

            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            res = run_phase(cfg, ds, "select", device=dev, wrap_model=wrap, collective=TorchCollective(),
                            autocast_dtype=dtype)
            rep = res.history[-1]
            r = int(ds.feature_shape[1]) * int(ds.feature_shape[2])
            bare = step_only_rate(out.get("steps"), r, dtype)
            row = {"data.resident": mode, "precision": str(dtype or torch.float32).replace("torch.", ""),
                   "batch_size": cfg.optim.batch_size, "R": r, "images": rep.images,
                   "images_per_s": rep.images_per_s, "data_wait_frac": rep.data_wait_frac,
                   "epoch_s": rep.epoch_time_s, "train_s": rep.seconds, "wall_s": time.perf_counter() - t0,
                   "train_share_of_epoch": rep.seconds / rep.epoch_time_s if rep.epoch_time_s else None,
                   "step_only_images_per_s": bare, "of_step_only": rep.images_per_s / bare if bare else None,
                   "peak_rss_mib": rep.peak_rss_mib, "resident_mib": rep.resident_mib,
                   "peak_gpu_mib": rep.gpu_peak_mib}
            out.setdefault("loop", []).append(row)
            say(f"  data.resident={mode:6s}: {rep.images_per_s:8.0f} img/s training ({row['precision']}, "
                f"B={cfg.optim.batch_size}, R={r}), data wait {100 * rep.data_wait_frac:5.1f}%, epoch "
                f"{rep.epoch_time_s:6.1f} s (training {rep.seconds:.1f} s)"
                + (f", {row['of_step_only']:.0%} of the bare step's {bare:.0f} img/s" if bare else "")
                + f", resident {rep.resident_mib:,.0f} MiB, peak RSS {rep.peak_rss_mib:,.0f} MiB"
                + (f", GPU peak {rep.gpu_peak_mib:,.0f} MiB" if dev.type == "cuda" else ""))


def _packed_loop(data: str, device: str, steps: int, threads: int, start, out) -> None:
    """One of several training loops sharing a device (a fractional-GPU sweep trial): DEDN steps on a
    fixed batch held on the device, timed between a common start and this loop's last step, with its
    share of the machine's cores as torch's intra-op threads (as a trial's Ray Train worker gets the
    whole CPUs it asked for: `dedn.training.driver.torch_threads`)."""
    torch.set_num_threads(threads)
    ds = FeatureDataset.open(data)
    cfg = config_for_dataset(ds.name, data, "cub")
    dev = torch.device(device)
    model = build_model(cfg, ds.class_side, ds.feature_shape).to(dev)
    family = family_of(cfg)
    protocol = ClassProtocol.for_phase("select", ds.class_side)
    ctx = StepContext(cfg=cfg, protocol=protocol, optimizers=family.optimizers(cfg, model), device=dev,
                      autocast_dtype=autocast_dtype_for(cfg.train.precision, dev), epoch=1, step=1)
    b = cfg.optim.batch_size
    x = torch.randn(b, *ds.feature_shape, device=dev)
    y = torch.tensor([protocol.seen[i % len(protocol.seen)] for i in range(b)], device=dev)
    for _ in range(3):  # warm-up: kernels, allocator, optimiser state
        family.train_step(model, x, y, ctx)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start.wait()
    t0 = time.perf_counter()
    for _ in range(steps):
        family.train_step(model, x, y, ctx)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out.put(b * steps / (time.perf_counter() - t0))


def packed_loops(data: str, device: str, counts: list[int], steps: int, out: dict) -> None:
    """1, 2, 4 ... training loops at once on one device, each its own process (as fractional-GPU trials
    run): images/s in total and per loop, to say how many trials to pack per GPU."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    cores = usable_cores()
    rows = []
    for n in counts:
        # each loop its share of the cores: torch's default (every core in every process) oversubscribes
        # them, which on the 2-core CPU dry run made 2 loops take 5.6 times as long as 1 (17.9 s vs 3.2 s)
        threads = max(1, cores // n)
        start, q = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_packed_loop, args=(data, device, steps, threads, start, q)) for _ in range(n)]
        for p in procs:
            p.start()
        rates = [q.get(timeout=600) for _ in range(n)]
        for p in procs:
            p.join(60)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a packed training loop failed (exit codes {[p.exitcode for p in procs]})")
        rows.append({"loops": n, "threads_per_loop": threads, "images_per_s_total": sum(rates),
                     "images_per_s_per_loop": sum(rates) / n})
        say(f"   {n} loop(s) at once: {sum(rates):8.0f} img/s in total, {sum(rates) / n:8.0f} per loop "
            f"({threads} CPU thread(s) each)")
    out["packed_loops"] = rows


def bf16_agreement(data: str, device: str, steps: int, out: dict) -> None:
    """fp32 and bf16 autocast training of DEDN from one init on the same batches (resident reader)."""
    ds = FeatureDataset.open(data)
    cfg = config_for_dataset(ds.name, data, "cub")
    dev = torch.device(device)
    res = decode_split(ds, "train").to(dev)
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


def extraction(device: str, tmp: Path, out: dict) -> None:
    """Part 5: the backbone's rate at 448 in fp32 and bf16, the decode rate per core and on all cores,
    and (where torchvision imports) our pipeline against the authors' on the same weights."""
    import numpy as np

    import runpy

    # the JPEG generator beside this script, by file: run through runpy (the bare-node test) its folder is not on the path
    generate = runpy.run_path(str(HERE / "benchmark_preprocess.py"), run_name="benchmark_preprocess")["generate"]
    from dedn.data.images import load_crop, load_image, normalize
    from dedn.nn.resnet import ResNetTrunk

    size, cuda = 448, device.startswith("cuda")
    batch = 64 if cuda else 2
    net = ResNetTrunk().eval().to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    rates = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        if dtype is not None and not fast_bf16(device)[0]:
            continue
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            net(x)  # warm-up: cuDNN picks its algorithms
            if cuda:
                torch.cuda.synchronize(device)
            reps, t0 = (10 if cuda else 1), time.perf_counter()
            for _ in range(reps):
                net(x)
            if cuda:
                torch.cuda.synchronize(device)
        rates[name] = reps * batch / (time.perf_counter() - t0)
    paths = generate(tmp, 48)
    load_crop(paths[0], size)
    t0 = time.perf_counter()
    for p in paths:
        normalize(load_crop(p, size))  # the decoding task's work and the actor's normalisation
    per_core = len(paths) / (time.perf_counter() - t0)
    cores = usable_cores()
    best = max(rates.values())
    out["extraction"] = {"backbone_images_per_s": {k: round(v, 1) for k, v in rates.items()}, "batch": batch,
                         "decode_images_per_s_per_core": round(per_core, 1), "cores": cores,
                         "cpu_side_share_of_backbone": round(min(1.0, per_core * (cores - 1) / best), 3)}
    say("   ResNet-101 trunk at 448, batch %d: " % batch + ", ".join(f"{k} {v:.0f} images/s" for k, v in rates.items()))
    say(f"   decode + preprocess: {per_core:.0f} images/s per core; {cores} cores (one left to the driver and "
        f"actor): {per_core * (cores - 1):.0f} images/s, {min(1.0, per_core * (cores - 1) / best):.0%} of the "
        f"backbone's best rate (target: 80 %)")
    try:
        import torchvision
        from torchvision import transforms
    except Exception as e:  # noqa: BLE001 - the CPU build of torch: torchvision's operators do not load
        out["extraction"]["torchvision"] = f"not importable ({type(e).__name__})"
        say(f"   torchvision does not import here ({type(e).__name__}): no comparison with the authors' pipeline")
        return
    from PIL import Image

    from dedn.data.images import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    ref = torchvision.models.resnet101(weights=None).eval().to(device)
    authors = torch.nn.Sequential(*list(ref.children())[:-2]).eval()
    ours = ResNetTrunk().eval().to(device)
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist())])
    inputs_a = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[:16]])
    inputs_b = torch.from_numpy(np.stack([load_image(p, size) for p in paths[:16]]))
    with torch.inference_mode():
        maps_a, maps_b = authors(inputs_a.to(device)), ours(inputs_b.to(device))
    out["extraction"]["torchvision"] = torchvision.__version__
    out["extraction"]["preprocessing_max_abs_diff"] = float((inputs_a - inputs_b).abs().max())
    out["extraction"]["maps_max_abs_diff"] = float((maps_a - maps_b).abs().max())
    say(f"   against torchvision {torchvision.__version__} (the authors' pipeline, same random weights, 16 images): "
        f"preprocessing max |diff| {out['extraction']['preprocessing_max_abs_diff']:.3g}, maps max |diff| "
        f"{out['extraction']['maps_max_abs_diff']:.3g}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--data", help="an existing CUB-shaped dataset directory (default: generate one)")
    ap.add_argument("--images-per-class", type=int, default=6,
                    help="images per class and split of the generated dataset (default: %(default)s, about 3,500 "
                         "images; 0: the real image count, 11,788, about 9.5 GB at 14 x 14)")
    ap.add_argument("--hw", type=int, default=14,
                    help="feature-map side of the generated dataset (default: %(default)s, the authors' 448-pixel "
                         "crops; 7 for 224)")
    ap.add_argument("--steps", type=int, default=300, help="steps of the bf16/fp32 comparison (default: %(default)s)")
    ap.add_argument("--skip-steps", action="store_true", help="skip part 2 (the step-time table)")
    ap.add_argument("--pack", type=int, nargs="*", default=[1, 2, 4],
                    help="training loops to run at once on the device, one measurement per count "
                         "(default: %(default)s; none: skip)")
    ap.add_argument("--pack-steps", type=int, default=200, help="steps of each packed loop (default: %(default)s)")
    ap.add_argument("--skip-extract", action="store_true", help="skip part 5 (feature extraction)")
    ap.add_argument("--out", help="folder for report.json (default: $DEDN_HOME/gpu_check/<time>)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); this check has not run. "
              "Use --device cpu for a smoke run of the same path.", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    folder = Path(args.out) if args.out else dedn_home() / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "torch": torch.__version__, "python": sys.version.split()[0],
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
    log = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            sys.__stdout__.write(s)
            log.write(s)
            return len(s)

        def flush(self) -> None:
            sys.__stdout__.flush()

    def save() -> None:  # after every part: a part that hangs or kills the process leaves the earlier ones
        report["seconds"] = round(time.perf_counter() - t_start, 1)
        write_text(folder / "report.json", json.dumps(report, indent=2))
        write_text(folder / "console.txt", log.getvalue())

    def part(name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
            report["parts"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - recorded with its traceback; the next part still runs
            report["parts"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                                     "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            say(f"   FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (traceback in report.json)")
        save()

    with redirect_stdout(Tee()), tempfile.TemporaryDirectory(prefix="dedn-gpu-check-") as tmp:
        name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
            f"CPU {torch.backends.cpu.get_cpu_capability()}"
        ok, why = fast_bf16(args.device)
        report["device_name"] = name
        say(f"== 1. device: {name}; torch {torch.__version__}; Python {report['python']}; bf16: {why}")

        def peaks() -> None:
            report["gemm_gflop_s"] = p = gemm_peaks(args.device)
            say("   GEMM peaks: " + ", ".join(f"{k} {v / 1000:.1f} TFLOP/s" for k, v in p.items()))

        part("gemm", peaks)
        if not args.skip_steps:
            say("== 2. training steps (bench/benchmark.py): share of the peak measured there")
            sys.stdout.flush()

            def steps() -> None:
                step_times(args.device, ["fp32"] + (["bf16"] if ok else []), folder / "steps.json")
                report["steps"] = json.loads((folder / "steps.json").read_text())

            part("steps", steps)
        if args.device.startswith("cuda"):
            say("== 2b. channel attention: the attention kernels that take it")
            part("sdpa", lambda: sdpa_backends(args.device, report))
        made: list[str] = [args.data] if args.data else []
        if not made:
            def generate() -> None:
                t0 = time.perf_counter()
                path = write_synthetic(Path(tmp) / "cub", "CUB", progress=False, height=args.hw, width=args.hw,
                                       **({"images_per_class": args.images_per_class} if args.images_per_class else {}))
                report["data"] = {"path": "generated", "feature_shape": list(FeatureDataset.open(path).feature_shape),
                                  "images_per_class": args.images_per_class or "all", "seconds":
                                  round(time.perf_counter() - t0, 1)}
                say(f"   generated a CUB-shaped semi-synthetic dataset (2048 x {args.hw} x {args.hw}) in "
                    f"{time.perf_counter() - t0:.0f} s")
                made.append(str(path))

            part("data", generate)
        if made:
            data = made[0]
            say("== 3. the training loop under DDP (world size 1, no Ray), one selection epoch: "
                "held in memory vs streamed")
            part("loop", lambda: loop_runs(data, args.device, report))
            if args.pack:
                say(f"== 3b. {', '.join(map(str, args.pack))} DEDN training loops at once on one device "
                    f"(separate processes, as fractional-GPU sweep trials), {args.pack_steps} steps each")
                part("packed_loops", lambda: packed_loops(data, args.device, args.pack, args.pack_steps, report))
            say(f"== 4. bf16 vs fp32: DEDN from one initialisation on the same batches, {args.steps} steps")
            if ok:
                part("bf16_vs_fp32", lambda: bf16_agreement(data, args.device, args.steps, report))
            else:
                say(f"   skipped: {why}")
        if not args.skip_extract:
            say("== 5. feature extraction: ResNet-101 at 448, and the CPU side that feeds it")
            part("extraction", lambda: extraction(args.device, Path(tmp), report))
        failed = [k for k, v in report["parts"].items() if not v["ok"]]
        say(f"== done in {time.perf_counter() - t_start:.0f} s; "
            + (f"FAILED parts: {', '.join(failed)}; " if failed else "") + f"report in {folder}")
        save()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
