"""DDP's options on the DEDN training step: step time and what each does to the loss.

    python bench/benchmark_ddp.py                        # 2 gloo processes, 1 thread each, R=49
    python bench/benchmark_ddp.py --workers 2 --steps 12 --r 49 --options none bf16_hook bucket100

W processes on this machine (torch.multiprocessing, gloo; NCCL with --device cuda, one GPU per
process) train DEDN at CUB shapes (B=50 per worker, C=2048, D=312, K=200) on fixed random batches
(the same on every run, different per rank), once without DDP communication at all (`no_ddp`:
each rank steps on its own gradients; the compute floor) and once per option set:

    default           torch's defaults (bucket 25 MB, no static graph, gradients copied into buckets)
    bucket_view       gradient_as_bucket_view=True (dedn's default: no gradient copy)
    static            static_graph=True
    bucket100         bucket_cap_mb=100 (fewer, larger all-reduces)
    fp16_hook         fp16 gradient compression (half the bytes on the wire; gloo and NCCL)
    bf16_hook         bf16 gradient compression (NCCL only: torch refuses it on gloo)
    all               bucket_view + static + the compression hook of the backend (bf16 NCCL, fp16 gloo)
    after_backward    no DDP: one all-reduce of all gradients (flattened) after the backward pass,
                      no overlap; on a CPU the backward then has its cores to itself

Printed per option set: median s/step over the timed steps (after 2 warm-up steps), the overhead
over no_ddp, and after the last step the loss and the largest parameter difference against
`default` (0 = bitwise the same training; the compression hooks round the averaged gradients), and the
ranks' parameter spread (0 when gradients are averaged).

Measured here (torch 2.13, gloo): static_graph=True leaves 12 of DEDN's parameter gradients
un-averaged (the spread is non-zero, the loss is no_ddp's), so dedn offers no static-graph key.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dedn.cli import HelpFormatter
from dedn.config import RunConfig
from dedn.families import get_family
from dedn.families.dedn.model import DEDN
from dedn.protocol import ClassProtocol

B, C, D, G, K = 50, 2048, 312, 300, 200
SIZES = (112, 87, 24, 40, 15, 34)
OPTIONS = {
    "no_ddp": None,
    "default": dict(bucket_cap_mb=25, static_graph=False, gradient_as_bucket_view=False, hook=False),
    "bucket_view": dict(bucket_cap_mb=25, static_graph=False, gradient_as_bucket_view=True, hook=False),
    "static": dict(bucket_cap_mb=25, static_graph=True, gradient_as_bucket_view=False, hook=False),
    "bucket100": dict(bucket_cap_mb=100, static_graph=False, gradient_as_bucket_view=False, hook=False),
    "fp16_hook": dict(bucket_cap_mb=25, static_graph=False, gradient_as_bucket_view=False, hook="fp16"),
    "bf16_hook": dict(bucket_cap_mb=25, static_graph=False, gradient_as_bucket_view=False, hook="bf16"),
    "all": dict(bucket_cap_mb=25, static_graph=True, gradient_as_bucket_view=True, hook="auto"),
    "after_backward": "manual",
}


def _worker(rank: int, world: int, args: argparse.Namespace, port: int, queue) -> None:
    torch.set_num_threads(args.threads)
    dev = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if dev.type == "cuda":  # else every rank's NCCL calls synchronise GPU 0
        torch.cuda.set_device(dev)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    h = int(round(args.r ** 0.5))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(D, generator=g).tolist()
    clusters, s = [], 0
    for n in SIZES:
        clusters.append(perm[s:s + n])
        s += n
    wv, ca = torch.randn(D, G, generator=g), torch.rand(K, D, generator=g)
    gx = torch.Generator().manual_seed(1 + rank)
    xs = [torch.rand(B, C, h, h, generator=gx).to(dev) for _ in range(4)]
    ys = [torch.randint(0, 150, (B,), generator=gx).to(dev) for _ in range(4)]
    cfg = RunConfig.for_family("dedn")
    family = get_family("dedn")
    protocol = ClassProtocol(tuple(range(150)), tuple(range(150, K)), K)
    out = {}
    for name in args.options:
        torch.manual_seed(0)
        model = DEDN(cfg.model, word_vectors=wv, class_attributes=ca, clusters=clusters, feature_shape=(C, h, h)).to(dev)
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4, alpha=0.99)
        o = OPTIONS[name]
        net = model
        if o is not None and o != "manual":
            net = DDP(model, device_ids=[rank] if dev.type == "cuda" else None, bucket_cap_mb=o["bucket_cap_mb"],
                      static_graph=o["static_graph"], gradient_as_bucket_view=o["gradient_as_bucket_view"])
            if o["hook"]:
                kind = o["hook"] if o["hook"] != "auto" else ("bf16" if dev.type == "cuda" else "fp16")
                net.register_comm_hook(None, getattr(default_hooks, f"{kind}_compress_hook"))
        times = []
        for step in range(args.steps + 2):
            dist.barrier()
            t = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = family.loss(net(xs[step % 4]), ys[step % 4], protocol, cfg)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if o == "manual":
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat)
                flat /= world
                for g_, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    g_.copy_(v)
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - t)
        # on the device: NCCL has no CPU path
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        # ranks must hold the same parameters after every step (averaged gradients): their spread
        mean = flat.clone()
        dist.all_reduce(mean)
        spread = (flat - mean / world).abs().max().reshape(1)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        out[name] = (statistics.median(times), float(loss.detach()), flat.cpu(), float(spread))
    if rank == 0:
        ref = out.get("default")
        queue.put({k: (t, lv, float((p - ref[2]).abs().max()) if ref is not None else float("nan"), sp)
                   for k, (t, lv, p, sp) in out.items()})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="processes (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per option set (default: %(default)s)")
    ap.add_argument("--r", type=int, default=49, help="regions, a perfect square (default: %(default)s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="gloo ranks on CPU, or NCCL on GPUs")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in the step")
    ap.add_argument("--options", nargs="+", default=None, choices=list(OPTIONS),
                    help="option sets (default: all that the backend accepts)")
    args = ap.parse_args(argv)
    if args.options is None:
        args.options = [k for k in OPTIONS if not (k == "bf16_hook" and args.device == "cpu")]
    if "default" not in args.options:
        args.options = ["default", *args.options]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, args.workers, args, port, queue)) for r in range(args.workers)]
    for p in procs:
        p.start()
    while queue.empty():  # a crashed worker would leave the other one, and this loop, waiting
        failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
        if failed:
            for p in procs:
                p.kill()
            raise SystemExit(f"benchmark_ddp: a worker failed (exit codes {failed}); its traceback is above")
        time.sleep(0.5)
    res = queue.get()
    for p in procs:
        p.join()
    floor = res.get("no_ddp", (float("nan"),))[0]
    print(f"DEDN step, {args.workers} x {args.device} ({args.threads} thread(s) each), B={B}/worker, R={args.r}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}; {args.steps} timed steps")
    print(f"{'options':>12} {'s/step':>8} {'vs no_ddp':>10} {'loss':>10} {'max |dparam| vs default':>24} "
          f"{'rank spread':>12}")
    for k, (t, loss, diff, spread) in res.items():
        print(f"{k:>12} {t:>8.3f} {t / floor - 1:>+9.1%} {loss:>10.5f} {diff:>24.3g} {spread:>12.3g}")
    print("rank spread: max |parameter - mean over ranks| after the last step; > 0 means the ranks' gradients "
          "were not averaged (no_ddp by design).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
