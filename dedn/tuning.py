"""Hyper-parameter sweeps of DEDN with Ray Tune (Optuna TPE + ASHA), selected on validation H.

What a sweep does (`run_sweep`):

* the search space comes from a YAML file (`load_search_space`): beta, gamma, epsilon by default;
  lambda_rc and lambda_e are NOT Tune dimensions unless `search_lambdas` — each trial refits
  them on its cached validation expert outputs at every report (`dedn.metrics.LambdaSearch`)
  and reports H at the best pair, with the pair;
* every trial trains with the training job's own loop (`dedn.engine.run_phase`, phase
  "select"), in-process (one worker) or as a Ray Train `TorchTrainer` (`dedn.distributed`);
* trials run inside `forbid_splits(TEST_SPLITS)`, set in the trial function itself so the guard
  holds in every Ray worker process; the dataset is opened without touching test shards;
* the driver logs one MLflow parent run per sweep and one child run per trial
  (`MLflowSweepCallback`, driver-side, so the sqlite store has a single writer);
* afterwards `summarise_sweep` picks the best (trial, epoch) on validation H, writes
  `best_config.yaml` (a complete `DEDNConfig`, protocol final, epochs = best epoch, fitted
  lambdas) and two plots, and logs them to the parent run;
* `run_final` retrains on trainval with that configuration through the training job.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import yaml
from ray import tune

from dedn.atomic import atomic_path, save_figure, write_text
from dedn.config import DEDNConfig, known_keys
from dedn.distributed import STATE_FILE  # the engine checkpoint dict inside a checkpoint folder
from dedn.errors import ConfigError
from dedn.protocol import SELECTION_SPLITS, TEST_SPLITS

__all__ = [
    "TEST_SPLITS", "SELECTION_SPLITS", "Dimension", "SearchSpace", "load_search_space", "default_space_path",
    "SweepSpec", "SweepSummary", "SweepInterrupted", "train_trial", "MLflowSweepCallback", "run_sweep", "summarise_sweep",
    "find_sweep", "run_final", "open_for_selection", "trial_metrics", "train_trial_distributed",
    "validation_lambda_grid", "best_config", "plot_lambda_curves", "plot_hparams",
]

DRIVER_CPUS = 0.01  # what a distributed trial's own function holds
DIM_TYPES = ("uniform", "loguniform", "int", "choice")
BEST_CONFIG_FILE = "best_config.yaml"
SWEEP_FILE = "sweep.json"
# metric names a trial reports (besides Tune's own); MLflow child runs log exactly these
REPORTED = ("val_H", "val_S", "val_U", "val_T", "lambda_rc", "lambda_e", "epoch", "loss", "best_val_H")


# ---- search space -----------------------------------------------------------------------
@dataclass(frozen=True)
class Dimension:
    """One searched config key: a uniform / log-uniform / integer range or a categorical choice."""

    key: str  # dotted DEDNConfig key, e.g. "loss.beta"
    kind: Literal["uniform", "loguniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()

    def to_tune(self) -> Any:
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper bound is exclusive
        return tune.choice(list(self.values))

    def corners(self) -> list[Any]:
        """The extreme values (checked against DEDNConfig when the space is loaded)."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: dimensions, the lambda dimensions, metric/mode and ASHA knobs."""

    dims: tuple[Dimension, ...]
    lambda_dims: tuple[Dimension, ...]
    metric: str = "val_H"
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    source: str = "search space"

    def param_space(self, search_lambdas: bool) -> dict[str, Any]:
        """Tune's param_space: {dotted key: Domain}; lambda dims join only with search_lambdas."""
        dims = self.dims + (self.lambda_dims if search_lambdas else ())
        return {d.key: d.to_tune() for d in dims}

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(d.key for d in self.dims)


def default_space_path(model: str = "dedn") -> Path:
    """tuning/search_space.yaml (DEDN) or tuning/search_space_<model>.yaml next to the package (a source checkout)."""
    name = "search_space.yaml" if model == "dedn" else f"search_space_{model}.yaml"
    return Path(__file__).resolve().parent.parent / "tuning" / name


def _parse_dim(key: str, spec: Any, source: str) -> Dimension:
    where = f"space.{key}"
    if key not in known_keys():
        raise ConfigError(where, "a dotted DEDNConfig key (dedn.config.known_keys())", key, source)
    if not isinstance(spec, Mapping):
        raise ConfigError(where, "a mapping {type, low, high} or {type: choice, values}", spec, source)
    kind = spec.get("type")
    if kind not in DIM_TYPES:
        raise ConfigError(f"{where}.type", "one of " + "|".join(DIM_TYPES), kind, source)
    unknown = set(spec) - {"type", "low", "high", "values"}
    if unknown:
        raise ConfigError(where, "only the fields type, low, high, values", sorted(unknown), source)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values", "a non-empty list", values, source)
        dim = Dimension(key, kind, values=tuple(values))
    else:
        lo, hi = spec.get("low"), spec.get("high")
        for name, v in (("low", lo), ("high", hi)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{where}.{name}", "a finite number", v, source)
        if not lo < hi:
            raise ConfigError(where, "low < high", f"low={lo}, high={hi}", source)
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}.low", "> 0 for a loguniform dimension", lo, source)
        if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise ConfigError(where, "integer bounds for an int dimension", f"low={lo}, high={hi}", source)
        dim = Dimension(key, kind, float(lo), float(hi))
    # every extreme value must make a valid DEDNConfig (e.g. lambda in [0, 1], beta >= 0)
    for v in dim.corners():
        try:
            DEDNConfig().replace(**{key: int(v) if kind == "int" else v})
        except ConfigError as e:
            raise ConfigError(where, f"values valid for {key} ({e.expected})", v, source) from None
    return dim


def load_search_space(path: str | os.PathLike[str] | None = None, model: str = "dedn") -> SearchSpace:
    """Read and validate a search-space YAML (format: tuning/search_space.yaml); ConfigError names the field.

    Without a path: the default space of `model` (tuning/search_space.yaml for DEDN).
    """
    path = Path(path) if path is not None else default_space_path(model)
    src = str(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("--space", "an existing search-space YAML file", src, "command line") from None
    except yaml.YAMLError as e:
        raise ConfigError("<file>", "valid YAML", f"{type(e).__name__}: {e}", src) from None
    if not isinstance(doc, Mapping):
        raise ConfigError("<root>", "a mapping", type(doc).__name__, src)
    unknown = set(doc) - {"metric", "mode", "space", "lambdas", "asha"}
    if unknown:
        raise ConfigError("<root>", "only the keys metric, mode, space, lambdas, asha", sorted(unknown), src)
    space = doc.get("space") or {}
    lambdas = doc.get("lambdas") or {}
    for name, block in (("space", space), ("lambdas", lambdas)):
        if not isinstance(block, Mapping):
            raise ConfigError(name, "a mapping {dotted key: dimension}", block, src)
    if not space:
        raise ConfigError("space", "at least one dimension", "none", src)
    bad = set(lambdas) - {"eval.lambda_rc", "eval.lambda_e"}
    if bad:
        raise ConfigError("lambdas", "only eval.lambda_rc and eval.lambda_e", sorted(bad), src)
    both = set(space) & set(lambdas)
    if both:
        raise ConfigError("lambdas", "keys not also under space", sorted(both), src)
    metric = doc.get("metric", "val_H")
    if metric not in REPORTED:
        raise ConfigError("metric", "one of " + "|".join(REPORTED), metric, src)
    mode = doc.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError("mode", "max or min", mode, src)
    asha = doc.get("asha") or {}
    if not isinstance(asha, Mapping) or set(asha) - {"grace_period", "reduction_factor"}:
        raise ConfigError("asha", "a mapping with grace_period and/or reduction_factor", asha, src)
    grace, rf = asha.get("grace_period", 1), asha.get("reduction_factor", 2)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
        raise ConfigError("asha.grace_period", "an int >= 1", grace, src)
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 1:
        raise ConfigError("asha.reduction_factor", "a number > 1", rf, src)
    return SearchSpace(
        dims=tuple(_parse_dim(k, v, src) for k, v in space.items()),
        lambda_dims=tuple(_parse_dim(k, v, src) for k, v in lambdas.items()),
        metric=metric, mode=mode, grace_period=grace, reduction_factor=rf, source=src,
    )


# ---- the dataset, opened without touching the test split -------------------------------
def open_for_selection(path: str | os.PathLike[str]) -> Any:
    """Open a dataset directory and check only the selection splits' shards.

    A plain `FeatureDataset.open` reads the footer of every shard, test ones included; a sweep
    must not open test files at all.
    """
    from dedn.dataset import FeatureDataset

    return FeatureDataset.open(path, splits=SELECTION_SPLITS)


# ---- what one trial reports ----------------------------------------------------------------
def trial_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Tune metrics of one `run_phase` epoch report (phase select): validation only.

    val_* are at the fitted (lambda_rc, lambda_e) when the trial fits them (`val_best`), else at
    the configured pair; lambda_rc / lambda_e say which pair; best_val_H is the best epoch so far.
    """
    from dedn.distributed import epoch_metrics

    m = epoch_metrics(report, images_per_s=0.0, epoch_time_s=0.0)  # the same keys a distributed trial reports
    return {k: float(m[k]) for k in REPORTED if k in m}


# ---- the trial function ---------------------------------------------------------------------
def _trial_config(base: Mapping[str, Any], config: Mapping[str, Any], search_lambdas: bool) -> DEDNConfig:
    """The base config (a DEDNConfig dict) with this trial's sampled dotted keys applied."""
    cfg = DEDNConfig.from_dict(base, source="sweep base config")
    over = {k: v for k, v in config.items() if k in known_keys()}
    over["protocol"] = "select"
    over["eval.fit_lambdas"] = not search_lambdas
    return cfg.replace(**over)


def train_trial(config: dict[str, Any], *, base: dict[str, Any], data: str, search_lambdas: bool = False) -> None:
    """Ray Tune function trainable: one selection run (`engine.run_phase`), reporting every epoch.

    Runs in the trial's worker process, so the test-split guard is entered here (it is per
    process). Each report carries a checkpoint (`state.pt`, the run_phase state with the best
    epoch's weights) so an interrupted sweep resumes where it stopped.
    """
    from dedn import engine
    from dedn.checkpoint import load_checkpoint, save_checkpoint
    from dedn.reader import forbid_splits

    with forbid_splits(TEST_SPLITS):
        cfg = _trial_config(base, config, search_lambdas)
        dataset = open_for_selection(data)
        resume = None
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                resume = load_checkpoint(Path(d) / STATE_FILE)

        def on_epoch_end(report: dict[str, Any]) -> None:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(Path(d) / STATE_FILE, report["state"]())
                tune.report(trial_metrics(report), checkpoint=tune.Checkpoint.from_directory(d))

        engine.run_phase(cfg, dataset, "select", device="cpu", on_epoch_end=on_epoch_end, resume=resume)


def _guarded_train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker loop of `dedn.distributed`, inside the test-split guard of this worker process."""
    from dedn.distributed import train_loop_per_worker
    from dedn.reader import forbid_splits

    with forbid_splits(TEST_SPLITS):
        train_loop_per_worker(config)


def train_trial_distributed(config: dict[str, Any], *, base: dict[str, Any], data: str, search_lambdas: bool = False,
                            workers: int = 2, cpus_per_worker: float = 0.5, storage: str = "") -> None:
    """Ray Tune function trainable for `--workers-per-trial N > 1`: the training job's TorchTrainer.

    The trainer comes from `dedn.distributed.build_trainer` (same loop, DDP, checkpoints as
    jobs/train.py); its workers report through `TuneReportCallback`. MLflow stays with the Tune
    driver (track=False here), and every worker enters the test-split guard.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from dedn import distributed
    from dedn.reader import forbid_splits

    with forbid_splits(TEST_SPLITS):
        cfg = _trial_config(base, config, search_lambdas).replace(**{"data.path": data})
        dataset = open_for_selection(data)
        settings = distributed.TrainSettings(num_workers=workers, cpus_per_worker=cpus_per_worker, max_failures=0,
                                             num_to_keep=1, register=False, track=False, verbose=False)
        trial_id = tune.get_context().get_trial_id() or "trial"
        trainer = distributed.build_trainer(cfg, settings, run_id=None, tracking_uri=None,
                                            semi_synthetic=dataset.semi_synthetic, storage_path=storage, name=trial_id,
                                            loop=_guarded_train_loop, callbacks=[TuneReportCallback()])
        trainer.fit()


# ---- validation H over the lambda grid (the paper's Figure 3) ---------------------------------
def validation_lambda_grid(cfg: DEDNConfig, dataset: Any, model_state: Mapping[str, Any], *,
                           device: str = "cpu") -> dict[str, np.ndarray]:
    """Validation T, U, S, H at every (lambda_rc, lambda_e) of the cfg.eval grid.

    One `engine.evaluate` pass over val_seen / val_unseen with the lambda fit on; its counts give
    every grid point. Returns lambda_rc (n,), lambda_e (m,) and T, U, S, H each (n, m).
    """
    from dedn import engine
    from dedn.protocol import ClassProtocol
    from dedn.reader import ShardReader, forbid_splits

    with forbid_splits(TEST_SPLITS):
        model = engine.model_from_state(cfg, dataset, model_state).to(device)
        protocol = ClassProtocol.selection(dataset.class_side)
        seen, unseen = (ShardReader(dataset, split, batch_size=cfg.eval.batch_size, shuffle=False)
                        for split in ("val_seen", "val_unseen"))
        search = engine.evaluate(model, seen, unseen, protocol, cfg, device=device, fit_lambdas=True).lambda_search
        assert search is not None
        grid = search.metrics_grid(protocol)  # {'T','U','S','H'}: (n_rc, n_e)
    return {"lambda_rc": np.asarray(search.rc_values), "lambda_e": np.asarray(search.e_values),
            **{k: v.numpy() for k, v in grid.items()}}


# ---- MLflow: one parent run per sweep, one child run per trial (driver side) ---------------
class MLflowSweepCallback(tune.Callback):
    """Tune callback that mirrors every trial into an MLflow child run of the sweep's parent run.

    It runs in the driver, so the sqlite store has one writer and trials need no MLflow. It holds
    only strings (Tune pickles it into the experiment state); on resume a trial's existing child
    run is found again by its `dedn.trial_id` tag instead of being created twice.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_name: str):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.sweep_name = parent_run_id, sweep_name
        self._runs: dict[str, str] = {}  # trial id -> MLflow run id
        self._client_obj: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client_obj": None}  # the client holds a DB engine

    @property
    def _client(self) -> Any:
        if self._client_obj is None:
            from mlflow.tracking import MlflowClient

            # registry_uri explicitly, as tracking.client() does: a registry URI set earlier would win
            self._client_obj = MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client_obj

    def run_id(self, trial: Any) -> str:
        """The child run of `trial`, created (with its sampled params) on first sight."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = self._client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.`dedn.trial_id` = '{tid}'",
        )
        if found:
            self._runs[tid] = found[0].info.run_id
            return self._runs[tid]
        from mlflow.entities import Param

        run = self._client.create_run(
            self.experiment_id, run_name=f"{self.sweep_name}/{tid}",
            tags={"mlflow.parentRunId": self.parent_run_id, "dedn.trial_id": tid, "dedn.sweep": self.sweep_name},
        )
        params = [Param(k, repr(v) if isinstance(v, float) else str(v)) for k, v in sorted(trial.config.items())]
        self._client.log_batch(run.info.run_id, params=params)
        self._runs[tid] = run.info.run_id
        return run.info.run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        step = int(result.get("training_iteration", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in REPORTED
                   if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])]
        if metrics:
            self._client.log_batch(self.run_id(trial), metrics=metrics)

    def _end(self, trial: Any, status: str) -> None:
        self._client.set_terminated(self.run_id(trial), status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")



# ---- the sweep -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepSpec:
    """Everything one sweep needs; `tuning/tune.py` builds it from the command line."""

    data: str  # dataset directory (absolute: Tune changes each trial's working directory)
    base: DEDNConfig  # preset <- key=value overrides; the searched keys override it per trial
    space: SearchSpace
    num_samples: int = 8
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1
    search_lambdas: bool = False
    name: str = ""  # "" = dedn-<dataset>-<UTC time>
    storage: str = ""  # "" = $DEDN_HOME/tune
    seed: int = 0  # Optuna TPE seed
    max_failures: int = 0  # retries of a failed trial (from its last checkpoint)
    verbose: int = 1

    def __post_init__(self) -> None:
        for key, v, lo in (("--num-samples", self.num_samples, 1), ("--max-concurrent-trials", self.max_concurrent_trials, 1),
                           ("--workers-per-trial", self.workers_per_trial, 1), ("--max-failures", self.max_failures, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(key, f"an int >= {lo}", v, "command line")
        if not self.cpus_per_trial > 0:
            raise ConfigError("--cpus-per-trial", "> 0", self.cpus_per_trial, "command line")


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial finished (Ctrl+C); it can be resumed."""


@dataclass(frozen=True)
class SweepSummary:
    """The outcome of a sweep, as written to <sweep dir>/summary.json."""

    sweep_dir: str
    best_trial_id: str
    best_val_H: float
    best_epoch: int  # epochs trained when validation H peaked (= the final run's epochs)
    lambda_rc: float
    lambda_e: float
    best_params: dict[str, Any]
    num_trials: int
    best_config_path: str
    plots: tuple[str, ...]
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)


def _trainable(spec_base: dict[str, Any], data: str, search_lambdas: bool, workers: int, cpus: float,
               sweep_dir: Path) -> Any:
    """The Tune trainable with its resources: in-process trial, or a TorchTrainer driver."""
    if workers <= 1:
        fn = tune.with_parameters(train_trial, base=spec_base, data=data, search_lambdas=search_lambdas)
        return tune.with_resources(fn, {"CPU": cpus})
    # The trial function only waits on the Ray Train controller (0 CPU is refused), and its share
    # comes out of the trial's budget: with --cpus-per-trial 2 on a 2-CPU node, workers asking for
    # 1 CPU each next to it never started (the worker group timed out after 60 s, measured).
    per_worker = max(0.01, (cpus - DRIVER_CPUS) / workers)
    fn = tune.with_parameters(train_trial_distributed, base=spec_base, data=data, search_lambdas=search_lambdas,
                              workers=workers, cpus_per_worker=per_worker, storage=str(sweep_dir / "train"))
    return tune.with_resources(fn, {"CPU": DRIVER_CPUS})


def _sweep_name(cfg: DEDNConfig) -> str:
    return f"dedn-{cfg.dataset.lower()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def run_sweep(spec: SweepSpec, *, resume: bool = False) -> SweepSummary:
    """Run (or, with resume, continue) a sweep and summarise it; returns the best configuration."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from dedn.reader import forbid_splits

    storage = Path(spec.storage or _tune_root()).expanduser().resolve()
    data = str(Path(spec.data).expanduser().resolve())
    name = spec.name or _sweep_name(spec.base)
    sweep_dir = storage / name
    with forbid_splits(TEST_SPLITS):  # the driver itself never reads test shards either
        open_for_selection(data)  # fail here, before any trial, on a bad dataset directory
        if resume:
            if not tune.Tuner.can_restore(str(sweep_dir)) or not (sweep_dir / SWEEP_FILE).exists():
                raise ConfigError("--resume", "the directory of an interrupted sweep", str(sweep_dir), "command line")
            meta = json.loads((sweep_dir / SWEEP_FILE).read_text())
        else:
            if sweep_dir.exists():
                raise ConfigError("--name", "a new sweep name (add --resume to continue that sweep)", name, "command line")
            sweep_dir.mkdir(parents=True)
            meta = _start_parent_run(spec, name, data, sweep_dir)
        base = DEDNConfig.from_dict(meta["base"], source=str(sweep_dir / SWEEP_FILE))
        trainable = _trainable(base.to_dict(), meta["data"], meta["search_lambdas"], spec.workers_per_trial, spec.cpus_per_trial,
                               sweep_dir)
        if resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True)
        else:
            callback = MLflowSweepCallback(meta["tracking_uri"], meta["experiment_id"], meta["parent_run_id"], name)
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
        results = tuner.fit()
        done = results.num_terminated + results.num_errors
        if done < len(results) or len(results) < meta["num_samples"]:  # Ctrl+C / SIGINT: Tune returns early
            raise SweepInterrupted(f"sweep {sweep_dir}: {done} of {meta['num_samples']} trials finished; continue with "
                                   f"`python tuning/tune.py --resume --name {name} --data {meta['data']}`")
        return summarise_sweep(results, sweep_dir, meta)


# ---- MLflow parent run and the sweep record ----------------------------------------------
def _tune_root() -> Path:
    from dedn import tracking

    return tracking.dedn_home() / "tune"


def _start_parent_run(spec: SweepSpec, name: str, data: str, sweep_dir: Path) -> dict[str, Any]:
    """Create the store (in the driver, before any trial), the experiment and the parent run; record them."""
    from dedn import tracking

    uri = tracking.init_store()  # the sqlite tables exist before any trial starts
    experiment_id = tracking.get_or_create_experiment(tracking.experiment_name(spec.base.dataset) + "-tune")
    client = tracking.client()
    run = client.create_run(experiment_id, run_name=name, tags={"dedn.sweep": name, tracking.KIND_TAG: "sweep"})
    params = {
        "sweep.num_samples": spec.num_samples, "sweep.max_concurrent_trials": spec.max_concurrent_trials,
        "sweep.cpus_per_trial": spec.cpus_per_trial, "sweep.workers_per_trial": spec.workers_per_trial,
        "sweep.search_lambdas": spec.search_lambdas, "sweep.seed": spec.seed, "sweep.space": spec.space.source,
        "sweep.metric": spec.space.metric, "sweep.mode": spec.space.mode, "data.path": data,
        **{f"base.{k}": v for k, v in spec.base.flat().items() if k != "data.path"},
    }
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    meta = {
        "name": name, "data": data, "num_samples": spec.num_samples, "base": spec.base.to_dict(), "search_lambdas": spec.search_lambdas,
        "metric": spec.space.metric, "mode": spec.space.mode, "space": spec.space.source,
        "keys": list(spec.space.keys) + ([d.key for d in spec.space.lambda_dims] if spec.search_lambdas else []),
        "log_keys": [d.key for d in spec.space.dims + spec.space.lambda_dims if d.kind == "loguniform"],
        "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": run.info.run_id,
    }
    write_text(sweep_dir / SWEEP_FILE, json.dumps(meta, indent=2))
    return meta


# ---- after the sweep --------------------------------------------------------------------------
def _trial_rows(results: Any, metric: str, mode: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial that reported: its sampled values and its best report (metric, epoch, lambdas)."""
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
            "lambda_rc": float(row["lambda_rc"]), "lambda_e": float(row["lambda_e"]),
            "params": {k: r.config[k] for k in keys if k in r.config},
            # in-process trials checkpoint through Tune; TorchTrainer trials report their checkpoint_path
            "checkpoint": (r.checkpoint.path if r.checkpoint is not None
                           else row.get("checkpoint_path") if isinstance(row.get("checkpoint_path"), str) else None),
        })
    return rows


def best_config(base: DEDNConfig, params: Mapping[str, Any], epochs: int, lambda_rc: float, lambda_e: float) -> DEDNConfig:
    """The configuration the final run trains: sampled values, fitted lambdas, epochs = best epoch."""
    from dedn.engine import final_config

    return final_config(base.replace(**params), epochs, (lambda_rc, lambda_e))


def plot_lambda_curves(grid: Mapping[str, np.ndarray], lambda_rc: float, lambda_e: float, path: Path,
                       title: str = "") -> Path:
    """Figure 3 of the paper from a validation grid (`validation_lambda_grid`): H against lambda_e with
    lambda_rc at its best value, and H against lambda_rc with lambda_e at its best value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rc, le, h = grid["lambda_rc"], grid["lambda_e"], grid["H"]  # (n,), (m,), (n, m)
    i, j = int(np.argmin(np.abs(rc - lambda_rc))), int(np.argmin(np.abs(le - lambda_e)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    axes[0].plot(le, 100 * h[i, :], marker="o", ms=3)
    axes[0].axvline(le[j], ls=":", c="grey")
    axes[0].set(xlabel=r"$\lambda_e$", ylabel="validation H (%)", title=rf"$\lambda_{{rc}}$ = {rc[i]:.2f}")
    axes[1].plot(rc, 100 * h[:, j], marker="o", ms=3, c="C1")
    axes[1].axvline(rc[i], ls=":", c="grey")
    axes[1].set(xlabel=r"$\lambda_{rc}$", ylabel="validation H (%)", title=rf"$\lambda_e$ = {le[j]:.2f}")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def plot_hparams(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], log_keys: Sequence[str], metric: str,
                 path: Path, title: str = "") -> Path:
    """Each trial's best validation H against each searched hyper-parameter (log axes for log-uniform ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r["params"].get(k), (int, float)) for r in rows)] or list(keys)[:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), constrained_layout=True, squeeze=False,
                             sharey=True)
    best = max(r[metric] for r in rows)
    for ax, k in zip(axes[0], keys):
        xs = [r["params"].get(k) for r in rows]
        if k in log_keys:  # log10 on a linear axis: readable ticks also when the trials span < 1 decade
            xs = [math.log10(x) if isinstance(x, (int, float)) and x > 0 else float("nan") for x in xs]
        ys = [100 * r[metric] for r in rows]
        is_best = [r[metric] == best for r in rows]
        ax.scatter([x for x, b in zip(xs, is_best) if not b], [y for y, b in zip(ys, is_best) if not b], c="C0", s=24,
                   label="trial (best epoch)")
        ax.scatter([x for x, b in zip(xs, is_best) if b], [y for y, b in zip(ys, is_best) if b], c="C3", s=30,
                   label="best validation H")
        ax.set(xlabel=f"log10({k})" if k in log_keys else k)
    axes[0][0].set_ylabel(f"{metric} (%)")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def summarise_sweep(results: Any, sweep_dir: Path, meta: Mapping[str, Any]) -> SweepSummary:
    """Pick the best (trial, epoch) on validation, write best_config.yaml, plots and summary.json; log them."""
    from dedn import tracking

    metric, mode = meta["metric"], meta["mode"]
    rows = _trial_rows(results, metric, mode, meta["keys"])
    if not rows:
        errors = [str(r.error)[:300] for r in results if r.error is not None]
        raise RuntimeError(f"sweep {sweep_dir}: no trial reported {metric}; errors: {errors[:3]}")
    best = (max if mode == "max" else min)(rows, key=lambda r: r[metric])
    base = DEDNConfig.from_dict(meta["base"], source=str(sweep_dir / SWEEP_FILE))
    cfg = best_config(base, best["params"], best["epoch"], best["lambda_rc"], best["lambda_e"])
    header = (f"# Best configuration of sweep {meta['name']} (trial {best['trial_id']}, epoch {best['epoch']}):\n"
              f"# validation {metric} = {best[metric]:.4f} at lambda_rc = {best['lambda_rc']:.3f}, "
              f"lambda_e = {best['lambda_e']:.3f}. Selected on validation only.\n"
              f"# Run:  python jobs/train.py --config {sweep_dir / BEST_CONFIG_FILE} --data {meta['data']}\n"
              f"#   or  python tuning/tune.py --final --name {meta['name']} --data {meta['data']}\n")
    best_path = sweep_dir / BEST_CONFIG_FILE
    write_text(best_path, header + cfg.to_yaml())
    semi = open_for_selection(meta["data"]).semi_synthetic
    title = f"sweep {meta['name']}, {len(rows)} trials" + ("  [semi-synthetic data]" if semi else "")
    plots = [plot_hparams(rows, meta["keys"], meta["log_keys"], metric, sweep_dir / "hparams.png", title)]
    if best["checkpoint"] and (Path(best["checkpoint"]) / STATE_FILE).exists():
        from dedn.checkpoint import load_checkpoint

        state = load_checkpoint(Path(best["checkpoint"]) / STATE_FILE)
        if state.get("best_model") is not None and int(state["best"]["epoch"]) == best["epoch"]:
            sel_cfg = _trial_config(meta["base"], best["params"], meta["search_lambdas"])
            grid = validation_lambda_grid(sel_cfg, open_for_selection(meta["data"]), state["best_model"])
            with atomic_path(sweep_dir / "lambda_grid.npz", suffix=".npz") as tmp:
                np.savez(tmp, **grid)
            plots.append(plot_lambda_curves(grid, best["lambda_rc"], best["lambda_e"], sweep_dir / "lambda_curves.png",
                                            f"best trial {best['trial_id']}, validation" + ("  [semi-synthetic data]" if semi else "")))
    summary = SweepSummary(
        sweep_dir=str(sweep_dir), best_trial_id=best["trial_id"], best_val_H=best[metric], best_epoch=best["epoch"],
        lambda_rc=best["lambda_rc"], lambda_e=best["lambda_e"], best_params=dict(best["params"]),
        num_trials=len(rows), best_config_path=str(best_path), plots=tuple(str(p) for p in plots),
        parent_run_id=meta["parent_run_id"], trials=rows,
    )
    write_text(sweep_dir / "summary.json", json.dumps(summary.__dict__, indent=2, default=str))
    client = tracking.client()
    run_id = meta["parent_run_id"]
    for p in (best_path, sweep_dir / "summary.json", *plots):
        client.log_artifact(run_id, str(p))
    client.log_metric(run_id, f"best_{metric}", best[metric])
    client.log_metric(run_id, "best_epoch", best["epoch"])
    client.set_tag(run_id, "dedn.best_trial_id", best["trial_id"])
    client.set_terminated(run_id, "FINISHED")
    return summary


def find_sweep(storage: str | os.PathLike[str] | None, dataset: str, name: str = "") -> Path:
    """The named sweep's directory, or the newest `dedn-<dataset>-*` sweep under storage."""
    root = Path(storage or _tune_root()).expanduser().resolve()
    if name:
        d = root / name
        if not (d / SWEEP_FILE).exists():
            raise ConfigError("--name", f"a sweep under {root} (with {SWEEP_FILE})", name, "command line")
        return d
    found = sorted((p for p in root.glob(f"dedn-{dataset.lower()}-*") if (p / SWEEP_FILE).exists()),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError("--name", f"a sweep of {dataset} under {root}", "none", "command line")
    return found[-1]


# ---- the final run ----------------------------------------------------------------------------
def run_final(sweep_dir: str | os.PathLike[str], *, workers: int = 1, cpus_per_worker: float = 0.0) -> Any:
    """Retrain the sweep's best configuration on trainval, test once and register it.

    This is the training job's own driver (`dedn.distributed.train`, as `jobs/train.py` calls it)
    on `best_config.yaml`: protocol final, epochs = the best trial's best epoch, lambdas = its
    fitted pair. Returns its TrainOutcome; the sweep's parent run is tagged with the final run id.
    """
    from dedn import distributed, tracking

    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / SWEEP_FILE).read_text())
    path = sweep_dir / BEST_CONFIG_FILE
    if not path.exists():
        raise ConfigError("--final", f"a finished sweep (with {BEST_CONFIG_FILE})", str(sweep_dir), "command line")
    cfg = DEDNConfig.from_dict(yaml.safe_load(path.read_text()), source=str(path))
    settings = distributed.TrainSettings(num_workers=workers, cpus_per_worker=cpus_per_worker,
                                         name=f"{meta['name']}-final")
    outcome = distributed.train(cfg, settings)
    if outcome.run_id:
        tracking.client().set_tag(meta["parent_run_id"], "dedn.final_run_id", outcome.run_id)
    return outcome
