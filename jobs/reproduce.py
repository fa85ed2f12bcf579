"""Train one configuration with several seeds at once and report the mean and spread of T, U, S, H.

    python jobs/reproduce.py --data DIR [--preset cub] [--num-seeds 3] [key=value ...]
    python jobs/reproduce.py --data DIR --seeds 214 215 216 --cpus-per-trial 2 --workers-per-trial 2
    python jobs/reproduce.py --data DIR model=msdn --gpus-per-trial 0.25      # any family; GPUs shared

Each seed runs the whole protocol (selection on validation, retraining on trainval, one test) as
a Ray Tune trial of its own, in parallel as far as the cluster allows; the seeds are the preset's
seed and the next ones (--num-seeds) or the ones given (--seeds). MLflow: one parent run in the
dataset's experiment, each seed's run a child; the parent holds the mean, standard deviation,
minimum and maximum (`seeds/test_H_mean`, ...) and `seeds.md`. `jobs/results_table.py --source
seeds` puts the newest one in the paper's Table 1 layout. Works embedded or under `ray job submit`.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # faster worker start-up (docs/stack-notes.md#ray-train-v2)

from dedn.cli import (HelpFormatter, add_address, add_overrides, add_trial_resources, parse_command_line,
                      require_environment, use_address)
from dedn.errors import DednError
from dedn.storage import resolve

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in main(), after the
# arguments are parsed: --help and a usage error answer at once.


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory (dataset.json)")
    p.add_argument("--preset", default="", help="a dataset's preset of the family (default: the dataset's own name)")
    p.add_argument("--num-seeds", type=int, default=3, help="seeds: the preset's optim.seed and the next ones")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="these seeds instead of --num-seeds")
    add_trial_resources(p, concurrent_default=0)  # a trial = one seed's run
    p.add_argument("--name", default="", help="the parent run's name (default seeds-<model>-<dataset>-<UTC time>)")
    p.add_argument("--storage-path", default="", help="Ray Train storage of the seeds' runs (default: $DEDN_HOME/ray_results)")
    add_overrides(p, "config overrides for every seed, e.g. optim.epochs=20")
    add_address(p)
    return parse_command_line(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    require_environment("torch", "ray", "mlflow", "pyarrow")  # a job run by another python: say so first
    use_address(args)
    from dedn.config import config_for_dataset  # heavy: after the arguments (see the imports above)
    from dedn.data import FeatureDataset
    from dedn.tracking.results import PAPER_DEDN
    from dedn.training.ray_cluster import init_ray
    from dedn.tuning.seeds import SeedsSpec, format_seeds, run_seeds, seed_list

    try:
        data = resolve(args.data)  # an absolute path, or an object-store URI (s3://...) as it is
        base = config_for_dataset(FeatureDataset.open(data, verify="none").name, data, args.preset or None,
                                  args.overrides)
        seeds = args.seeds if args.seeds else seed_list(base.optim.seed, args.num_seeds)
        spec = SeedsSpec(data=data, base=base, seeds=seeds, workers_per_trial=args.workers_per_trial,
                         cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                         max_concurrent_trials=args.max_concurrent_trials, name=args.name, storage=args.storage_path)
        init_ray(dashboard=True)  # every seed is a TorchTrainer: Tune frees finished trials through the State API
        summary = run_seeds(spec)
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paper = PAPER_DEDN.get(summary.dataset) if summary.model == "dedn" else None
    print(format_seeds(summary, paper), end="")
    print(f"MLflow: parent run {summary.parent_run_id} in experiment {summary.experiment} ({len(summary.rows)} child runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
