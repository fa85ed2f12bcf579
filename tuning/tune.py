"""Ray Tune sweep of a model family's hyper-parameters (DEDN: beta, gamma, epsilon), selected on validation H.

    python tuning/tune.py --data DIR [--preset cub] [--space FILE] [--num-samples 8]
    python tuning/tune.py --data DIR model=msdn     # MSDN and its own search space
        [--max-concurrent-trials 2] [--cpus-per-trial 1] [--gpus-per-trial 0] [--workers-per-trial 1]
        [--search-lambdas]
        [--name NAME] [--resume] [--final] [key=value ...]

The default search space is the family's own (dedn/families/<model>/search_space.yaml); the
family's inference weights (DEDN: lambda_rc, lambda_e) are refitted on validation at every
report unless --search-lambdas makes them Tune dimensions. Every trial is the training job's own
driver: a TorchTrainer of --workers-per-trial workers, on CPUs or, with --gpus-per-trial G, on
G GPUs split among them (a fraction shares a GPU between trials). `key=value` overrides the preset for every
trial (e.g. `optim.epochs=20`). `--resume` continues
an interrupted sweep (`--name`, or the newest sweep of the dataset). `--final` retrains the
best configuration on trainval, tests once and registers the model (after the sweep, or alone
to use a finished sweep). Works embedded or under `ray job submit`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # faster worker start-up (docs/stack-notes.md#ray-train-v2)

from dedn.cli import (HelpFormatter, add_address, add_overrides, add_trial_resources, command, parse_command_line,
                      require_environment, use_address)
from dedn.errors import ConfigError, DednError
from dedn.storage import resolve

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory (dataset.json)")
    p.add_argument("--preset", default="", help="a dataset's preset of the family (default: the dataset's own name)")
    p.add_argument("--space", default=None, help="search-space YAML (default: the model family's own)")
    p.add_argument("--num-samples", type=int, default=8, help="trials")
    add_trial_resources(p, concurrent_default=2)
    p.add_argument("--search-lambdas", action="store_true",
                   help="make the family's inference weights Tune dimensions instead of fitting them on validation")
    p.add_argument("--seed", type=int, default=0, help="Optuna TPE seed")
    p.add_argument("--name", default="", help="sweep name (default <model>-<dataset>-<UTC time>)")
    p.add_argument("--storage", default="", help="sweep storage root (default $DEDN_HOME/tune)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep --name (or the newest)")
    p.add_argument("--final", action="store_true", help="retrain the best configuration on trainval and register it")
    p.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial from its checkpoint")
    add_overrides(p, "config overrides for every trial, anywhere on the command line, e.g. optim.epochs=20")
    add_address(p)
    return parse_command_line(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_environment("torch", "ray", "mlflow", "pyarrow")  # a job run by another python: say so first
    use_address(args)
    # Ray Tune and torch load here, after argparse: `--help` and usage errors stay instant
    from dedn.config import config_for_dataset  # heavy: after the arguments (see the imports above)
    from dedn.data import FeatureDataset
    from dedn.protocol import SELECTION_SPLITS
    from dedn.training.ray_cluster import init_ray
    from dedn.tuning import SweepInterrupted, SweepSpec, find_sweep, load_search_space, run_final, run_sweep

    try:
        data = resolve(args.data)  # an absolute path, or an object-store URI (s3://...) as it is
        name = FeatureDataset.open(data, splits=SELECTION_SPLITS).name  # never the test shards
        base = config_for_dataset(name, data, args.preset or None, args.overrides)
        # Every trial is a TorchTrainer: they need the dashboard's State API, without it the next
        # trial waited > 60 s for the CPUs of a finished one (docs/stack-notes.md#ray-connecting-and-authentication)
        init_ray(dashboard=True)
        finished = None  # --final --name NAME on a finished sweep: no new trials
        if args.final and args.name and not args.resume:
            try:
                d = find_sweep(args.storage, base.dataset, args.name, base.model.name)
                finished = d if (d / "summary.json").exists() else None
            except ConfigError:  # no sweep of that name yet: run it, then the final phase
                finished = None
        if finished is not None:
            sweep_dir = finished
        else:
            spec = SweepSpec(
                data=data, base=base, space=load_search_space(args.space, base.model.name), num_samples=args.num_samples,
                max_concurrent_trials=args.max_concurrent_trials, cpus_per_trial=args.cpus_per_trial,
                gpus_per_trial=args.gpus_per_trial,
                workers_per_trial=args.workers_per_trial, search_lambdas=args.search_lambdas, seed=args.seed,
                name=args.name or (find_sweep(args.storage, base.dataset, model=base.model.name).name if args.resume else ""),
                storage=args.storage, max_failures=args.max_failures,
            )
            summary = run_sweep(spec, resume=args.resume)
            sweep_dir = Path(summary.sweep_dir)
            weights = ", ".join(f"{k} = {v:.2f}" for k, v in summary.weights.items())
            print(f"sweep {sweep_dir.name}: {summary.num_trials} trials in {sweep_dir}")
            print(f"best trial {summary.best_trial_id}: validation H = {summary.best_val_H:.4f} at epoch "
                  f"{summary.best_epoch}, {weights}")
            print(f"best configuration: {summary.best_config_path}")
            for plot in summary.plots:
                print(f"plot: {plot}")
            if not args.final:
                storage = ("--storage", args.storage) if args.storage else ()
                print(f"next: {command('tuning/tune.py', '--data', data, '--final', '--name', sweep_dir.name, *storage)}"
                      "   (retrain the best configuration on trainval, test once, register)")
        if args.final:
            out = run_final(sweep_dir, workers=args.workers_per_trial, use_gpu=args.gpus_per_trial > 0)
            weights = ", ".join(f"{k} {v:.2f}" for k, v in out.weights.items())
            print(f"final run: trainval, {out.best_epoch} epochs, {weights}")
            for label, m in (("validation (%)", out.val_metrics), ("test       (%)", out.test_metrics)):
                if m:
                    print(f"  {label}: " + "  ".join(f"{k} {100 * m[k]:.1f}" for k in ("T", "U", "S", "H") if k in m))
            if out.registered is not None:
                print(f"registered {out.registered.name} version {out.registered.version}; "
                      f"{out.registered.champion_line()}")
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
