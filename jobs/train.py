"""Train DEDN (or MSDN: `model=msdn`) on Ray Train (DDP), track it in MLflow and register the final model.

    python jobs/train.py                                  # demo: semi-synthetic data, embedded Ray
    python jobs/train.py --data DIR --preset cub [key=value ...] [--num-workers N] [--use-gpu]
    python jobs/train.py --data DIR --config best_config.yaml   # e.g. a sweep's best configuration
    python jobs/train.py --data DIR --preset cub model=msdn      # MSDN with its authors' CUB settings
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "$(python jobs/runtime_env.py)" \\
        -- python jobs/train.py --data /abs/path/DIR --preset cub epochs=20   # README "On a cluster"

Without a cluster an embedded Ray is started; `ray.init()` joins a running cluster when there is
one. Runs, metrics, artifacts and the model registry go to $MLFLOW_TRACKING_URI, default
sqlite:///$DEDN_HOME/mlflow.db (DEDN_HOME defaults to ~/.dedn).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # faster worker start-up (docs/stack-notes.md#ray-train-v2)

from dedn import tracking
from dedn.cli import (HelpFormatter, add_address, add_overrides, command, parse_command_line, program,
                      require_environment, use_address)
from dedn.errors import DednError
from dedn.storage import resolve

# The heavy imports (torch, pyarrow, Ray, MLflow and the dedn modules on them) are in the functions below,
# after the arguments are parsed: --help and a usage error answer at once.

# The demo: the reference variant (calibrated stacking makes U, H meaningful at this size), 25 epochs
# at lr 1e-3 so the tiny semi-synthetic set learns within a minute or two; user key=value pairs still win.
DEMO_OVERRIDES = ("variant=reference", "epochs=25", "optim.lr=0.001")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_overrides(p, "config overrides, anywhere on the command line, e.g. loss.beta=0.01 epochs=3")
    p.add_argument("--data", default="", help="dataset directory (dataset.json); default: build the semi-synthetic demo")
    p.add_argument("--preset", default="",
                   help="a dataset's preset of the model family (default: the dataset's own name, when the family "
                        "has one): DEDN's paper settings, with model=msdn MSDN's (dedn/families/<model>/presets/)")
    p.add_argument("--config", default="", help="a YAML config file applied over the preset (e.g. a sweep's best_config.yaml)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, bf16 autocast")
    p.add_argument("--cpus-per-worker", type=float, default=0.0, help="CPUs per worker (default: fit the cluster)")
    p.add_argument("--max-failures", type=int, default=2, help="restarts from the last checkpoint after a failure")
    p.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept (best validation H, plus the latest)")
    p.add_argument("--storage-path", default="", help="Ray Train storage: a folder every node sees, or s3://bucket/prefix "
                   "(AWS_* variables; default: $DEDN_HOME/ray_results)")
    p.add_argument("--name", default="", help="Ray Train run name (default: a new dedn-<dataset>-<time> name)")
    p.add_argument("--experiment", default="", help="MLflow experiment (default: dedn-<dataset>)")
    p.add_argument("--no-register", action="store_true", help="do not register the final model")
    p.add_argument("--no-track", action="store_true", help="no MLflow run (and no registry)")
    add_address(p)
    return parse_command_line(p, argv)


def _pct(m: dict[str, float] | None) -> str:
    return "n/a" if not m else "  ".join(f"{k} {100 * m[k]:.1f}" for k in ("T", "U", "S", "H") if k in m)


_TERMINATED: list[int] = []  # the signal that stopped the run, if one did


def _exit_on_sigterm(signum: int, frame: object) -> None:
    print("train.py: SIGTERM: stopping; the MLflow run is marked KILLED. Run again with the same --name to continue "
          "from the last checkpoint.", file=sys.stderr, flush=True)
    _TERMINATED.append(signum)
    sys.exit(128 + signum)


def main(argv: list[str] | None = None, *, handle_sigterm: bool | None = None) -> int:
    """The job. handle_sigterm: default when run as a program (argv None)."""
    args = parse(argv)
    require_environment("torch", "ray", "mlflow", "pyarrow")  # a job run by another python: say so first
    use_address(args)
    if handle_sigterm is None:
        handle_sigterm = argv is None
    if handle_sigterm:
        # run as a program: a SIGTERM (kill, a scheduler) exits cleanly, so the MLflow run is marked
        # KILLED and the embedded Ray shuts down (atexit) instead of being left behind
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from dedn.config import config_for_dataset  # heavy: after the arguments (see the imports above)
    from dedn.data import FeatureDataset
    from dedn.training.driver import TrainSettings, train

    try:
        overrides = list(args.overrides)
        if args.data:
            data = resolve(args.data)  # an absolute path, or an object-store URI (s3://...) as it is
        else:
            from dedn.data.demo import ensure_demo_dataset  # heavy: after the arguments (see the imports above)

            data, created = ensure_demo_dataset()
            print(f"{'Built' if created else 'Using'} the SEMI-SYNTHETIC demo dataset at {data} "
                  "(real AWA2 class side, generated feature maps; its numbers say nothing about real images)", flush=True)
            overrides = list(DEMO_OVERRIDES) + overrides
        ds = FeatureDataset.open(data)
        cfg = config_for_dataset(ds.name, str(data), args.preset or None, overrides, config_file=args.config or None)
        settings = TrainSettings(
            num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures, num_to_keep=args.num_to_keep, storage_path=args.storage_path,
            name=args.name, experiment=args.experiment, register=not args.no_register, track=not args.no_track,
        )
        label = "SEMI-SYNTHETIC " if ds.semi_synthetic else ""
        print(f"Training {cfg.model.name.upper()} on {label}{ds.name} ({data}), variant {cfg.variant}, protocol {cfg.protocol}, "
              f"{cfg.optim.epochs} epochs, {args.num_workers} worker(s){' with GPUs' if args.use_gpu else ''}", flush=True)
        out = train(cfg, settings)
    except DednError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit:
        if _TERMINATED:  # Ray's blocking calls turn the handler's exit into SystemExit(1): keep 128 + signal
            return 128 + _TERMINATED[0]
        raise

    tag = " (semi-synthetic data)" if ds.semi_synthetic else ""
    print("\n" + "=" * 78)
    print(f"Done in {out.seconds:.0f} s. {ds.name}{tag}, variant {cfg.variant}:")
    print(f"  selected epoch {out.best_epoch}, " + ", ".join(f"{k} {v:.2f}" for k, v in out.weights.items()))
    print(f"  validation (%): {_pct(out.val_metrics)}")
    print(f"  test       (%): {_pct(out.test_metrics)}")
    print(f"  checkpoints: {out.storage_dir}")
    # the commands below are meant to be pasted: this environment's programs, the checkout's scripts
    if out.run_id:
        print(f"  MLflow run {out.run_id} (experiment {args.experiment or tracking.experiment_name(cfg.dataset)})")
        if out.tracking_uri and not out.tracking_uri.startswith(("http://", "https://")):
            print(f"  browse: {program('mlflow')} ui --backend-store-uri {shlex.quote(out.tracking_uri)}")
        print(f"  run page: {tracking.run_page(out.tracking_uri or tracking.tracking_uri(), out.experiment_id, out.run_id)}")
    if out.registered is not None:
        r = out.registered
        print(f"  registered model {r.name} version {r.version}; {r.champion_line()}")
        print("  predict: " + command("jobs/predict.py", "--model", r.model_uri, "--data", data, "--split", "test_unseen",
                                      "--out", tracking.dedn_home() / "predictions" / f"{r.name}-v{r.version}-test_unseen.parquet"))
    print("=" * 78)
    return 0


if __name__ == "__main__":
    sys.exit(main())
