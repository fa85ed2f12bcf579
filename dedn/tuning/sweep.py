"""Hyper-parameter sweeps of any model family with Ray Tune (Optuna TPE + ASHA), selected on validation H.

What a sweep does (`run_sweep`):

* the search space comes from a YAML file (`load_search_space`), by default the family's own
  (`ModelFamily.search_space_file`; DEDN: beta, gamma, epsilon); the family's inference weights
  are NOT Tune dimensions unless `search_lambdas` — each trial refits them on its cached
  validation score parts at every report (`dedn.metrics.WeightSearch`) and reports H there;
* every trial is the training job's own driver (`dedn.training.driver.train`, protocol
  "select"): a TorchTrainer of one or N workers whose reports reach Tune as in Ray's
  Train/Tune interop examples (relayed by the trial's own thread: `dedn.tuning.trial`); a
  selection run never opens a test shard;
* the driver logs one MLflow parent run per sweep and one child run per trial
  (`MLflowSweepCallback`, driver-side, so the sqlite store has a single writer);
* afterwards `summarise_sweep` picks the best (trial, epoch) on validation H, writes
  `best_config.yaml` (a complete `RunConfig`, protocol final, epochs = best epoch, fitted
  lambdas) and two plots, and logs them to the parent run;
* `run_final` retrains on trainval with that configuration through the training job.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from dedn import tracking
from dedn.storage import resolve
from dedn.atomic import atomic_path, write_text
from dedn.checkpoint import load_checkpoint
from dedn.cli import command
from dedn.config import RunConfig
from dedn.data.reader import forbid_splits
from dedn.errors import ConfigError
from dedn.families import family_of
from dedn.protocol import TEST_SPLITS
from dedn.tracking.names import metric_key
from dedn.training import driver
from dedn.training.driver import STATE_FILE
from dedn.training.loop import final_config
from dedn.training.preflight import trial_resource_problem
from dedn.training.node_cache import start_node_caches
from dedn.tuning.space import reported_metrics, SearchSpace
from dedn.tuning.plots import plot_lambda_curves, plot_hparams
from dedn.tuning.trial import open_for_selection, trial_config, tune_trainable, validation_weight_grid


BEST_CONFIG_FILE = "best_config.yaml"


SWEEP_FILE = "sweep.json"


class MLflowSweepCallback(tune.Callback):
    """Tune callback that mirrors every trial into an MLflow child run of the sweep's parent run.

    It runs in the driver, so the sqlite store has one writer and trials need no MLflow. It holds
    only strings (Tune pickles it into the experiment state); on resume a trial's existing child
    run is found again by its `dedn.trial_id` tag instead of being created twice.
    """

    def __init__(self, experiment_name: str, parent_run_id: str, sweep_name: str, reported: Sequence[str],
                 weight_names: Sequence[str] = ()):
        self.experiment_name, self.parent_run_id, self.sweep_name = experiment_name, parent_run_id, sweep_name
        self.keys = {k: metric_key(k, weight_names) for k in reported}  # reported name -> its key in a training run
        self._runs: dict[str, str] = {}  # trial id -> MLflow run id

    def run_id(self, trial: Any) -> str:
        """The child run of `trial`, created (with its sampled params) on first sight."""
        tid = trial.trial_id
        if tid not in self._runs:
            found = tracking.find_child_run(self.experiment_name, self.parent_run_id, {tracking.TRIAL_TAG: tid})
            self._runs[tid] = found or tracking.start_run(
                f"{self.sweep_name}/{tid}", experiment=self.experiment_name, parent_run_id=self.parent_run_id,
                tags={tracking.TRIAL_TAG: tid, tracking.SWEEP_TAG: self.sweep_name},
                params={k: repr(v) if isinstance(v, float) else str(v) for k, v in sorted(trial.config.items())})[1]
        return self._runs[tid]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metrics = {key: float(result[k]) for k, key in self.keys.items()
                   if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])}
        if metrics:
            tracking.log_metrics(self.run_id(trial), metrics, step=int(result.get("training_iteration", 0)))

    def _end(self, trial: Any, status: str) -> None:
        tracking.finish_run(self.run_id(trial), status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")


@dataclass(frozen=True)
class SweepSpec:
    """Everything one sweep needs; `tuning/tune.py` builds it from the command line."""

    data: str  # dataset directory (absolute: Tune changes each trial's working directory)
    base: RunConfig  # preset <- key=value overrides; the searched keys override it per trial
    space: SearchSpace
    num_samples: int = 8
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # 0: trials train on CPUs; a fraction packs several trials onto one GPU
    workers_per_trial: int = 1
    search_lambdas: bool = False
    name: str = ""  # "" = <model>-<dataset>-<UTC time>
    storage: str = ""  # "" = $DEDN_HOME/tune
    seed: int = 0  # Optuna TPE seed
    max_failures: int = 0  # retries of a failed trial (from its last checkpoint)
    verbose: int = 1

    def __post_init__(self) -> None:
        for key, v, lo in (("num_samples", self.num_samples, 1), ("max_concurrent_trials", self.max_concurrent_trials, 1),
                           ("workers_per_trial", self.workers_per_trial, 1), ("max_failures", self.max_failures, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"sweep.{key}", f"an int >= {lo}", v, "SweepSpec")
        if not self.cpus_per_trial > 0:
            raise ConfigError("sweep.cpus_per_trial", "> 0", self.cpus_per_trial, "SweepSpec")
        if not 0 <= self.gpus_per_trial <= self.workers_per_trial:
            raise ConfigError("sweep.gpus_per_trial", f"between 0 and {self.workers_per_trial} (at most one GPU per "
                              f"worker, {self.workers_per_trial} worker(s) per trial)", self.gpus_per_trial, "SweepSpec")


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl+C); it can be resumed."""


@dataclass(frozen=True)
class SweepSummary:
    """The outcome of a sweep, as written to <sweep dir>/summary.json."""

    sweep_dir: str
    best_trial_id: str
    best_val_H: float
    best_epoch: int  # epochs trained when validation H peaked (= the final run's epochs)
    weights: dict[str, float]  # the family's inference weights fitted at that epoch
    best_params: dict[str, Any]
    num_trials: int
    best_config_path: str
    plots: tuple[str, ...]
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)


def _sweep_name(cfg: RunConfig) -> str:
    return f"{cfg.model.name}-{cfg.dataset.lower()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def check_trial_resources(spec: SweepSpec) -> None:
    """ConfigError, before any trial starts, when the cluster lacks one trial's CPUs or GPUs (with Ray up)."""
    import ray

    if not ray.is_initialized():  # Tune starts its own Ray: nothing to ask yet
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    problem = trial_resource_problem(ray.cluster_resources(), nodes, spec.cpus_per_trial, spec.gpus_per_trial)
    if problem:
        raise ConfigError("--cpus-per-trial/--gpus-per-trial", "a trial the cluster can place", problem, "sweep preflight")


def run_sweep(spec: SweepSpec, *, resume: bool = False) -> SweepSummary:
    """Run (or, with resume, continue) a sweep and summarise it; returns the best configuration."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory": Tune's table says it all

    storage = Path(spec.storage or _tune_root()).expanduser().resolve()
    data = resolve(spec.data)  # an absolute path, or an object-store URI as it is (staged once per node)
    name = spec.name or _sweep_name(spec.base)
    sweep_dir = storage / name
    with forbid_splits(TEST_SPLITS):  # the driver itself never reads test shards either
        open_for_selection(data)  # fail here, before any trial, on a bad dataset directory
        check_trial_resources(spec)  # and on a trial the cluster can never place (Tune would wait for ever)
        if resume:
            if not tune.Tuner.can_restore(str(sweep_dir)) or not (sweep_dir / SWEEP_FILE).exists():
                raise ConfigError("sweep.resume", "the directory of an interrupted sweep", str(sweep_dir), "run_sweep")
            meta = json.loads((sweep_dir / SWEEP_FILE).read_text())
        else:
            if sweep_dir.exists():
                raise ConfigError("sweep.name", "a new sweep name (or resume that sweep)", name, "run_sweep")
            sweep_dir.mkdir(parents=True)
            meta = _start_parent_run(spec, name, data, sweep_dir)
        base = RunConfig.from_dict(meta["base"], source=str(sweep_dir / SWEEP_FILE))
        trainable = tune_trainable(base.to_dict(), meta["data"], meta["search_lambdas"], spec.workers_per_trial,
                                   spec.cpus_per_trial, sweep_dir, spec.gpus_per_trial)
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
        else:
            callback = MLflowSweepCallback(meta["experiment"], meta["parent_run_id"], name, reported_metrics(base.model.name),
                                           family_of(base).weight_names)
            tuner = tune.Tuner(
                trainable,
                param_space=spec.space.param_space(spec.search_lambdas),
                tune_config=tune.TuneConfig(
                    metric=spec.space.metric, mode=spec.space.mode, num_samples=spec.num_samples,
                    max_concurrent_trials=spec.max_concurrent_trials,
                    search_alg=OptunaSearch(seed=spec.seed),
                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=base.optim.epochs,
                                            grace_period=min(spec.space.grace_period, base.optim.epochs),
                                            reduction_factor=spec.space.reduction_factor),
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(storage), callbacks=[callback], verbose=spec.verbose,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                ),
            )
        if base.data.resident != "off" and base.data.resident_shared:  # one decoded copy per node for all concurrent trials, owned here
            start_node_caches()
        results = tuner.fit()
        done = results.num_terminated + results.num_errors
        if done < len(results) or len(results) < meta["num_samples"]:  # Ctrl+C / SIGINT: Tune returns early
            raise SweepInterrupted(f"sweep {sweep_dir}: {done} of {meta['num_samples']} trials finished; continue with "
                                   f"`{command('tuning/tune.py', '--resume', '--name', name, '--data', meta['data'])}`")
        return summarise_sweep(results, sweep_dir, meta)


def _tune_root() -> Path:
    return tracking.dedn_home() / "tune"


def _start_parent_run(spec: SweepSpec, name: str, data: str, sweep_dir: Path) -> dict[str, Any]:
    """Create the store (in the driver, before any trial), the experiment and the parent run; record them."""
    uri = tracking.init_store()  # the sqlite tables exist before any trial starts
    experiment = tracking.experiment_name(spec.base.dataset) + "-tune"
    params = {
        "sweep.num_samples": spec.num_samples, "sweep.max_concurrent_trials": spec.max_concurrent_trials,
        "sweep.cpus_per_trial": spec.cpus_per_trial, "sweep.gpus_per_trial": spec.gpus_per_trial,
        "sweep.workers_per_trial": spec.workers_per_trial,
        "sweep.search_lambdas": spec.search_lambdas, "sweep.seed": spec.seed, "sweep.space": spec.space.source,
        "sweep.metric": spec.space.metric, "sweep.mode": spec.space.mode, "data.path": data,
        **{f"base.{k}": v for k, v in spec.base.flat().items() if k != "data.path"},
    }
    experiment_id, run_id = tracking.start_run(name, experiment=experiment, params=params,
                                               tags={tracking.SWEEP_TAG: name, tracking.KIND_TAG: "sweep",
                                                     tracking.MODEL_TAG: spec.base.model.name})
    meta = {
        "name": name, "data": data, "num_samples": spec.num_samples, "base": spec.base.to_dict(), "search_lambdas": spec.search_lambdas,
        "metric": spec.space.metric, "mode": spec.space.mode, "space": spec.space.source,
        "keys": list(spec.space.keys) + ([d.key for d in spec.space.lambda_dims] if spec.search_lambdas else []),
        "log_keys": [d.key for d in spec.space.dims + spec.space.lambda_dims if d.kind == "loguniform"],
        "tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id, "parent_run_id": run_id,
    }
    write_text(sweep_dir / SWEEP_FILE, json.dumps(meta, indent=2))
    return meta


def _trial_rows(results: Any, metric: str, mode: str, keys: Sequence[str], weight_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial that reported: its sampled values and its best report (metric, epoch, weights)."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or df.empty or metric not in df:
            continue
        df = df[np.isfinite(df[metric].astype(float))]
        if df.empty:
            continue
        i = df[metric].idxmax() if mode == "max" else df[metric].idxmin()  # first of ties: earliest epoch
        row = df.loc[i]
        rows.append({
            "trial_id": str(row["trial_id"]), metric: float(row[metric]),
            "epoch": int(row["training_iteration"]), "epochs_run": int(df["training_iteration"].max()),
            "weights": {w: float(row[w]) for w in weight_names},
            "val": {k: float(row[f"val_{k}"]) for k in ("T", "U", "S", "H") if f"val_{k}" in row},
            "params": {k: r.config[k] for k in keys if k in r.config},
            # the trial's last checkpoint (Ray Train always keeps the latest): its state holds the best
            # epoch's weights ("best_model"); TorchTrainer trials report the folder under `checkpoint_path`
            "checkpoint": _last_checkpoint(df, r),
        })
    return rows


def _last_checkpoint(df: Any, result: Any) -> str | None:
    last = df.loc[df["training_iteration"].idxmax()]
    path = last.get("checkpoint_path")
    if isinstance(path, str):
        return path
    return result.checkpoint.path if result.checkpoint is not None else None


def best_config(base: RunConfig, params: Mapping[str, Any], epochs: int, weights: Mapping[str, float]) -> RunConfig:
    """The configuration the final run trains: sampled values, fitted lambdas, epochs = best epoch."""
    return final_config(base.replace(**params), epochs, weights)


def summarise_sweep(results: Any, sweep_dir: Path, meta: Mapping[str, Any]) -> SweepSummary:
    """Pick the best (trial, epoch) on validation, write best_config.yaml, plots and summary.json; log them."""
    metric, mode = meta["metric"], meta["mode"]
    base = RunConfig.from_dict(meta["base"], source=str(sweep_dir / SWEEP_FILE))
    fam = family_of(base)
    rows = _trial_rows(results, metric, mode, meta["keys"], fam.weight_names)
    if not rows:
        errors = [str(r.error)[:300] for r in results if r.error is not None]
        raise RuntimeError(f"sweep {sweep_dir}: no trial reported {metric}; errors: {errors[:3]}")
    best = (max if mode == "max" else min)(rows, key=lambda r: r[metric])
    cfg = best_config(base, best["params"], best["epoch"], best["weights"])
    header = (f"# Best configuration of sweep {meta['name']} (trial {best['trial_id']}, epoch {best['epoch']}):\n"
              f"# validation {metric} = {best[metric]:.4f} at "
              + ", ".join(f"{k} = {v:.3f}" for k, v in best["weights"].items()) + ". Selected on validation only.\n"
              f"# Run:  {command('jobs/train.py', '--config', sweep_dir / BEST_CONFIG_FILE, '--data', meta['data'])}\n"
              f"#   or  {command('tuning/tune.py', '--final', '--name', meta['name'], '--data', meta['data'])}\n")
    best_path = sweep_dir / BEST_CONFIG_FILE
    write_text(best_path, header + cfg.to_yaml())
    semi = open_for_selection(meta["data"]).semi_synthetic
    title = f"sweep {meta['name']}, {len(rows)} trials" + ("  [semi-synthetic data]" if semi else "")
    plots = [plot_hparams(rows, meta["keys"], meta["log_keys"], metric, sweep_dir / "hparams.png", title,
                          max_epochs=base.optim.epochs)]
    if best["checkpoint"] and (Path(best["checkpoint"]) / STATE_FILE).exists():
        state = load_checkpoint(Path(best["checkpoint"]) / STATE_FILE)
        if state.get("best_model") is not None and int(state["best"]["epoch"]) == best["epoch"]:
            sel_cfg = trial_config(meta["base"], best["params"], meta["search_lambdas"])
            grid = validation_weight_grid(sel_cfg, open_for_selection(meta["data"]), state["best_model"], meta=state.get("meta"))
            with atomic_path(sweep_dir / "lambda_grid.npz", suffix=".npz") as tmp:
                np.savez(tmp, **grid)
            plots.append(plot_lambda_curves(grid, best["weights"], sweep_dir / "lambda_curves.png",
                                            f"best trial {best['trial_id']}, validation" + ("  [semi-synthetic data]" if semi else "")))
    summary = SweepSummary(
        sweep_dir=str(sweep_dir), best_trial_id=best["trial_id"], best_val_H=best[metric], best_epoch=best["epoch"],
        weights=dict(best["weights"]), best_params=dict(best["params"]),
        num_trials=len(rows), best_config_path=str(best_path), plots=tuple(str(p) for p in plots),
        parent_run_id=meta["parent_run_id"], trials=rows,
    )
    write_text(sweep_dir / "summary.json", json.dumps(summary.__dict__, indent=2, default=str))
    run_id = meta["parent_run_id"]
    for p in (best_path, sweep_dir / "summary.json", *plots):
        tracking.log_artifact(run_id, p)
    tracking.log_metrics(run_id, {f"best_{metric}": best[metric], "best_epoch": best["epoch"]})
    tracking.set_tags(run_id, {tracking.BEST_TRIAL_TAG: best["trial_id"]})
    tracking.finish_run(run_id)
    return summary


def find_sweep(storage: str | os.PathLike[str] | None, dataset: str, name: str = "", model: str = "dedn") -> Path:
    """The named sweep's directory, or the newest `<model>-<dataset>-*` sweep under storage."""
    root = Path(storage or _tune_root()).expanduser().resolve()
    if name:
        d = root / name
        if not (d / SWEEP_FILE).exists():
            raise ConfigError("sweep.name", f"a sweep under {root} (with {SWEEP_FILE})", name, "find_sweep")
        return d
    found = sorted((p for p in root.glob(f"{model}-{dataset.lower()}-*") if (p / SWEEP_FILE).exists()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError("sweep.name", f"a sweep of {dataset} under {root}", "none", "find_sweep")
    return found[-1]


def run_final(sweep_dir: str | os.PathLike[str], *, workers: int = 1, cpus_per_worker: float = 0.0,
              use_gpu: bool = False) -> Any:
    """Retrain the sweep's best configuration on trainval, test once and register it.

    This is the training job's own driver (`dedn.training.driver.train`, as `jobs/train.py` calls
    it) on `best_config.yaml`: protocol final, epochs = the best trial's best epoch, weights = its
    fitted ones. Returns its TrainOutcome; the sweep's parent run is tagged with the final run id.
    """
    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / SWEEP_FILE).read_text())
    path = sweep_dir / BEST_CONFIG_FILE
    if not path.exists():
        raise ConfigError("sweep", f"a finished sweep (with {BEST_CONFIG_FILE})", str(sweep_dir), "run_final")
    cfg = RunConfig.from_dict(yaml.safe_load(path.read_text()), source=str(path))
    # the best trial's validation metrics become the registered version's val_* tags: the sweep's winner
    # competes for `champion` like any run (without them it compared as NaN and never won)
    summary = json.loads((sweep_dir / "summary.json").read_text()) if (sweep_dir / "summary.json").exists() else {}
    best_row = next((t for t in summary.get("trials", []) if t.get("trial_id") == summary.get("best_trial_id")), {})
    settings = driver.TrainSettings(num_workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu,
                                    name=f"{meta['name']}-final",
                                    selection_val=best_row.get("val") or None)
    outcome = driver.train(cfg, settings)
    if outcome.run_id:
        tracking.set_tags(meta["parent_run_id"], {tracking.FINAL_RUN_TAG: outcome.run_id})
    return outcome
