"""Train every model family (DEDN, MSDN, ...) with the same data, seed and budget; write one comparison table.

    python jobs/compare.py --data DIR [--preset cub] --epochs 30 [key=value ...]
    python jobs/compare.py --epochs 2 --max-steps 20        # no --data: a small CUB-shaped semi-synthetic set
    python jobs/compare.py --data DIR --protocol two_phase --out results/compare --no-track
    python jobs/compare.py --data DIR --epochs 30 d3gzsl:model.hidden=1024 msdn:optim.lr=5e-4   # per family

Each model starts from its family's preset for the dataset (dedn/families/<model>/presets/); seed,
epochs, steps per epoch, protocol and data are forced equal (dedn.analysis.compare). Every model trains on
Ray Train through the one training driver. Writes compare.md and compare.csv to --out and, unless
--no-track, opens a parent MLflow run in experiment `dedn-compare-<dataset>` that holds each
model's training run as a child, its T/U/S/H and images/s as metrics, and both tables.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dedn import tracking
from dedn.cli import HelpFormatter, add_address, add_overrides, parse_command_line, use_address
from dedn.errors import DednError
from dedn.storage import resolve
from dedn.home import dedn_home

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_overrides(p, "config overrides applied to every model, anywhere on the command line; family:key=value "
                     "applies to that family only")
    p.add_argument("--data", default="", help="dataset directory; default: write a CUB-shaped semi-synthetic set")
    p.add_argument("--preset", default="", help="dataset preset of every family (default: the dataset's name)")
    p.add_argument("--models", nargs="+", default=None, help="model families (default: every registered one)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per model")
    p.add_argument("--epochs", type=int, default=1, help="epochs of every model (the same budget for all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every model (optim.seed)")
    p.add_argument("--max-steps", type=int, default=0, help="training steps per epoch (0 = full passes)")
    p.add_argument("--protocol", default="final", choices=["final", "two_phase"],
                   help="final: train on trainval, test once; two_phase: select on validation first")
    p.add_argument("--out", default="compare_out", help="directory for compare.md / compare.csv")
    p.add_argument("--no-track", action="store_true", help="no MLflow run")
    syn = p.add_argument_group("semi-synthetic data (without --data)")
    syn.add_argument("--channels", type=int, default=2048, help="C of the feature maps")
    syn.add_argument("--size", type=int, default=7, help="H = W of the feature maps")
    syn.add_argument("--images-per-class", type=int, default=4, help="cap per class and split")
    add_address(p)
    return parse_command_line(p, argv)


def _synthetic_cub(args: argparse.Namespace) -> Path:
    from dedn.data import MANIFEST_FILE  # heavy: after the arguments (see the imports above)
    from dedn.data.synthetic import write_synthetic

    root = dedn_home() / "data" / f"compare-cub-{args.channels}x{args.size}x{args.size}-{args.images_per_class}"
    if not (root / MANIFEST_FILE).exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(root, "CUB", None, overwrite=True, channels=args.channels, height=args.size, width=args.size,
                        images_per_class=args.images_per_class, seed=0, progress=True)
    return root


def _start_parent(args: argparse.Namespace, ds, models: list[str]) -> str:
    tracking.init_store()
    _, run_id = tracking.start_run(
        "compare-" + "-".join(models), experiment=f"dedn-compare-{ds.name.lower()}",
        tags={tracking.KIND_TAG: "comparison", "dataset": ds.name, "semi_synthetic": str(ds.semi_synthetic).lower(),
              "data_path": ds.location, **({"git_commit": c} if (c := tracking.git_commit()) else {})},
        params={"models": ",".join(models), "epochs": args.epochs, "seed": args.seed, "max_steps_per_epoch": args.max_steps,
                "protocol": args.protocol, "overrides": " ".join(args.overrides), "num_workers": args.num_workers})
    return run_id


def _finish_parent(run_id: str, rows, files: tuple[Path, Path]) -> None:
    metrics: dict[str, float] = {}
    for r in rows:
        metrics.update({f"{r.model}.{m}": getattr(r, m) for m in ("T", "U", "S", "H", "images_per_s")})
        metrics[f"{r.model}.parameters"] = r.parameters
    tracking.log_metrics(run_id, metrics)
    for path in files:
        tracking.log_artifact(run_id, path)
    tracking.finish_run(run_id)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    use_address(args)
    from dedn.analysis.compare import compare_models, write_table  # heavy: after the arguments (see the imports above)
    from dedn.data import FeatureDataset

    from dedn.families import family_names
    from dedn.training.driver import TrainSettings

    run_id = ""
    try:
        data = resolve(args.data) if args.data else _synthetic_cub(args)  # a path, or an object-store URI as it is
        ds = FeatureDataset.open(data)
        models = args.models or list(family_names())
        if not args.no_track:
            run_id = _start_parent(args, ds, models)
        settings = TrainSettings(num_workers=args.num_workers, track=not args.no_track, register=False, max_failures=0)
        rows = compare_models(ds, preset=args.preset or None, models=models, epochs=args.epochs, seed=args.seed,
                              max_steps_per_epoch=args.max_steps, protocol=args.protocol, overrides=args.overrides,
                              settings=settings, parent_run_id=run_id)
    except DednError as e:
        if run_id:
            tracking.finish_run(run_id, "FAILED")
        print(f"error: {e}", file=sys.stderr)
        return 2
    c, h, w = ds.feature_shape
    title = (f"{'SEMI-SYNTHETIC ' if ds.semi_synthetic else ''}{ds.name} ({c}x{h}x{w}), protocol {args.protocol}, "
             f"{args.epochs} epoch(s){f' x {args.max_steps} steps' if args.max_steps else ''}, seed {args.seed}")
    md_path, csv_path = write_table(rows, args.out, title=title)
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")
    if run_id:
        _finish_parent(run_id, rows, (md_path, csv_path))
        print(f"MLflow run {run_id} (artifacts compare.md, compare.csv; one child run per model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
