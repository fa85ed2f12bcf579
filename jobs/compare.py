"""Train DEDN and MSDN with the same data, seed and budget and write one comparison table.

    python jobs/compare.py --data DIR [--preset cub] --epochs 30 [key=value ...]
    python jobs/compare.py --epochs 2 --max-steps 20        # no --data: a small CUB-shaped semi-synthetic set
    python jobs/compare.py --data DIR --protocol two_phase --out results/compare --no-track

Each model starts from its own preset (dedn/presets/<ds>.yaml, dedn/presets/msdn_<ds>.yaml); seed,
epochs, steps per epoch, protocol and data are forced equal (dedn.compare). Writes compare.md and
compare.csv to --out and, unless --no-track, logs both as artifacts of an MLflow run in experiment
`dedn-compare-<dataset>` with each model's T/U/S/H and images/s as metrics.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedn.errors import DednError  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every model")
    p.add_argument("--data", default="", help="dataset directory; default: write a CUB-shaped semi-synthetic set")
    p.add_argument("--preset", default="", choices=["", "cub", "sun", "awa2"], help="default: the dataset's name")
    p.add_argument("--models", nargs="+", default=["dedn", "msdn"], choices=["dedn", "msdn"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="training steps per epoch (0 = full passes)")
    p.add_argument("--protocol", default="final", choices=["final", "two_phase"])
    p.add_argument("--out", default="compare_out", help="directory for compare.md / compare.csv")
    p.add_argument("--no-track", action="store_true", help="no MLflow run")
    syn = p.add_argument_group("semi-synthetic data (without --data)")
    syn.add_argument("--channels", type=int, default=2048)
    syn.add_argument("--size", type=int, default=7, help="H = W of the feature maps")
    syn.add_argument("--images-per-class", type=int, default=4, help="cap per class and split")
    return p.parse_args(argv)


def _synthetic_cub(args: argparse.Namespace) -> Path:
    from dedn.dataset import MANIFEST_FILE
    from dedn.synthetic import write_synthetic
    from dedn.tracking import dedn_home

    root = dedn_home() / "data" / f"compare-cub-{args.channels}x{args.size}x{args.size}-{args.images_per_class}"
    if not (root / MANIFEST_FILE).exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic(root, "CUB", None, overwrite=True, channels=args.channels, height=args.size, width=args.size,
                        images_per_class=args.images_per_class, seed=0, progress=True)
    return root


def _track(rows, files: tuple[Path, Path], args: argparse.Namespace, data: Path, semi: bool) -> str:
    from mlflow.entities import Param

    from dedn import tracking

    exp = tracking.get_or_create_experiment(f"dedn-compare-{rows[0].dataset.lower()}")
    run = tracking.client().create_run(exp, run_name="compare-" + "-".join(args.models), tags={
        "dataset": rows[0].dataset, "semi_synthetic": str(semi).lower(), "data_path": str(data),
        **({"git_commit": c} if (c := tracking.git_commit()) else {})})
    log = tracking.RunLogger(run.info.run_id)
    params = {"models": ",".join(args.models), "epochs": args.epochs, "seed": args.seed,
              "max_steps_per_epoch": args.max_steps, "protocol": args.protocol, "overrides": " ".join(args.overrides)}
    log.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    for r in rows:
        log.log_metrics({f"{r.model}.{m}": getattr(r, m) for m in ("T", "U", "S", "H", "images_per_s")}
                        | {f"{r.model}.parameters": r.parameters}, step=0)
    for path in files:
        log.client.log_artifact(run.info.run_id, str(path))
    log.finish()
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from dedn.compare import compare_models, write_table
    from dedn.dataset import FeatureDataset

    try:
        data = Path(args.data).expanduser().resolve() if args.data else _synthetic_cub(args)
        ds = FeatureDataset.open(data)

        def progress(model: str, report: dict) -> None:
            t = report["train"]
            print(f"  {model} {report['phase']} epoch {report['epoch']}/{report['epochs']}: loss {t.get('loss', float('nan')):.4f}, "
                  f"{t['images_per_s']:.1f} img/s", flush=True)

        rows = compare_models(ds, preset=args.preset or None, models=args.models, epochs=args.epochs, seed=args.seed,
                              max_steps_per_epoch=args.max_steps, protocol=args.protocol, overrides=args.overrides,
                              on_epoch_end=progress)
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c, h, w = ds.feature_shape
    title = (f"{'SEMI-SYNTHETIC ' if ds.semi_synthetic else ''}{ds.name} ({c}x{h}x{w}), protocol {args.protocol}, "
             f"{args.epochs} epoch(s){f' x {args.max_steps} steps' if args.max_steps else ''}, seed {args.seed}")
    md_path, csv_path = write_table(rows, args.out, title=title)
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")
    if not args.no_track:
        run_id = _track(rows, (md_path, csv_path), args, data, ds.semi_synthetic)
        print(f"MLflow run {run_id} (artifacts compare.md, compare.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
