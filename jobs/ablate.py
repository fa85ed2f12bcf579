"""The paper's ablations (Table 3) and cluster studies (Figure 5) on one dataset, one Ray Train run each.

    python jobs/ablate.py --data DIR --preset cub                       # every setting (9 runs)
    python jobs/ablate.py --data DIR --preset cub --settings full,no_ca,cexp_no_distill epochs=5
    python jobs/ablate.py --data DIR --settings table3 --out results/ablation-cub
    python jobs/ablate.py --list                                        # the settings and what they change

Each setting (the studies registered for the model family in dedn/analysis/ablation.py: DEDN's) is trained by
the one training driver (`dedn.training.driver.train`: the two-phase protocol on Ray Train,
tracked in MLflow) as a child
run of one parent run in experiment `dedn-<dataset>-ablation`; ablated models are not registered.
The table (rows = settings, columns T U S H in %, one decimal) is printed, written to --out as
ablation.md / ablation.csv (plus cluster_study.png when a Figure 5 setting ran) and logged on the
parent run. Numbers on semi-synthetic datasets are labelled as such.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # faster worker start-up (docs/stack-notes.md#ray-train-v2)

from dedn import tracking
from dedn.cli import HelpFormatter, add_address, add_overrides, parse_command_line, use_address
from dedn.errors import ConfigError, DednError
from dedn.storage import resolve

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_overrides(p, "config overrides applied to every setting, anywhere on the command line, e.g. epochs=5 "
                     "(not the switches the settings set)")
    p.add_argument("--data", default="", help="dataset directory (dataset.json)")
    p.add_argument("--preset", default="", help="preset of a dataset (default: the dataset's own name)")
    p.add_argument("--model", default="dedn", help="model family whose studies run (default: dedn)")
    p.add_argument("--settings", default="", help="comma-separated setting keys or groups table3|figure5 (default: all)")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--out", default="", help="folder for ablation.md / ablation.csv (default: <DEDN_HOME>/ablations/<run>)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers per run")
    p.add_argument("--cpus-per-worker", type=float, default=0.0, help="CPUs per worker (default: fit the cluster)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (NCCL, bf16 autocast)")
    p.add_argument("--storage-path", default="", help="Ray Train storage: a folder every node sees, or s3://bucket/prefix "
                   "(AWS_* variables; default: $DEDN_HOME/ray_results)")
    p.add_argument("--experiment", default="", help="MLflow experiment (default: dedn-<dataset>-ablation)")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first failing setting")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines from the workers")
    add_address(p)
    return parse_command_line(p, argv)


def list_settings(model: str) -> str:
    from dedn.analysis.ablation import family_settings  # heavy: after the arguments (see the imports above)

    settings = family_settings(model)
    full = next(iter(settings.values())).full
    lines = [f"{'key':<16} {'paper label':<26} changes (from the full model: {', '.join(f'{k}={v}' for k, v in full)})"]
    for s in settings.values():
        changes = ", ".join(f"{k}={v}" for k, v in s.changes) or "-"
        lines.append(f"{s.key:<16} {s.label:<26} {changes}  ({s.description})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    use_address(args)
    try:
        if args.list:
            print(list_settings(args.model))
            return 0
        from dedn.analysis import ablation  # heavy: after the arguments (see the imports above)
        from dedn.config import config_for_dataset, parse_overrides
        from dedn.data import FeatureDataset
        from dedn.training.driver import TrainSettings, train
        from dedn.training.loop import build_model

        if not args.data:
            raise ConfigError("--data", "a dataset directory (dataset.json)", "", "command line")
        data = resolve(args.data)  # an absolute path, or an object-store URI (s3://...) as it is
        ds = FeatureDataset.open(data)
        user = {**parse_overrides(args.overrides), "model.name": args.model}
        ablation.check_base_overrides({k: v for k, v in user.items() if k != "model.name"}, args.model)
        settings = ablation.select_settings(args.settings.split(",") if args.settings else None, args.model)
        base = config_for_dataset(ds.name, str(data), args.preset or None, user)
        for s in settings:  # every configuration (clusters included) is valid before the first run starts
            build_model(ablation.setting_config(base, s), ds.class_side, ds.feature_shape)
        experiment = args.experiment or tracking.experiment_name(base.dataset) + "-ablation"
        semi = ds.semi_synthetic

        tracking.init_store()  # in the driver, before any Ray worker touches the store
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        parent_name = f"ablation-{base.dataset.lower()}-{stamp}"
        parent_tags = tracking.run_tags(base, semi_synthetic=semi, data_path=str(data),
                                        extra={tracking.KIND_TAG: "ablation", "dedn.ablation.settings": ",".join(s.key for s in settings)})
        _, parent_id = tracking.start_run(parent_name, experiment=experiment, tags=parent_tags, params=base.flat())
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    label = "SEMI-SYNTHETIC " if semi else ""
    print(f"Ablation on {label}{ds.name} ({data}): {len(settings)} settings, {base.optim.epochs} epochs each, "
          f"MLflow parent run {parent_id} in {experiment}", flush=True)

    def train_one(setting: ablation.Setting, cfg) -> ablation.AblationResult:
        ray_name = f"{parent_name}-{setting.key}"
        print(f"\n--- {setting.key}: {setting.label} ({', '.join(f'{k}={v}' for k, v in setting.changes) or 'full'})",
              flush=True)
        ts = TrainSettings(num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                           storage_path=args.storage_path, name=ray_name, experiment=experiment, register=False,
                           verbose=not args.quiet, parent_run_id=parent_id,
                           tags={tracking.KIND_TAG: "ablation", tracking.SETTING_TAG: setting.key})
        out = train(cfg, ts)
        return ablation.AblationResult(setting, metrics=out.test_metrics, run_id=out.run_id, seconds=out.seconds)

    def on_result(r: ablation.AblationResult) -> None:
        if r.ok:
            m = r.metrics or {}
            tracking.log_metrics(parent_id, {f"{r.setting.key}.{k}": m[k] for k in ablation.METRICS if k in m})
            print(f"--- {r.setting.key}: " + "  ".join(f"{k} {100 * m[k]:.1f}" for k in ablation.METRICS if k in m)
                  + f" ({r.seconds:.0f} s)", flush=True)
        else:
            print(f"--- {r.setting.key} FAILED: {r.error}", file=sys.stderr, flush=True)

    try:
        results = ablation.run_ablation(base, settings, train_one, on_result=on_result, keep_going=not args.stop_on_error)
    except BaseException:
        tracking.finish_run(parent_id, "FAILED")
        raise

    out_dir = Path(args.out).expanduser().resolve() if args.out else tracking.dedn_home() / "ablations" / parent_name
    note = f"{base.optim.epochs} epoch(s), protocol {base.protocol}, variant {base.variant}."
    paths = ablation.write_table(results, out_dir, ds.name, semi_synthetic=semi, note=note)
    plot = ablation.plot_cluster_study(results, out_dir / "cluster_study.png", ds.name, semi_synthetic=semi)
    for p in [*paths.values(), *([plot] if plot else [])]:
        tracking.log_artifact(parent_id, p)
    failed = [r for r in results if not r.ok]
    tracking.finish_run(parent_id, "FAILED" if failed else "FINISHED")

    print("\n" + paths["markdown"].read_text())
    print(f"Written: {', '.join(str(p) for p in [*paths.values(), *([plot] if plot else [])])}")
    print(f"MLflow parent run {parent_id} (experiment {experiment}, store {tracking.tracking_uri()})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
