"""Multi-seed reproduction: one configuration's whole protocol for N seeds at once, as Ray Tune trials.

The paper reports one seed per dataset, and GZSL numbers move by points of H between seeds; a
change helps only if it beats that spread. `run_seeds` trains the configuration (a preset with its
overrides, any family) once per seed, each seed a Tune trial whose function is the training job's
own driver (`dedn.training.driver.train`: selection on validation, retraining on trainval, one
test), a TorchTrainer of its own, so the seeds run in parallel on whatever the cluster has.
Selection stays on validation only: a seed's test numbers are those of the epoch and weights its
own validation chose.

MLflow: one parent run (`dedn.kind` = "seeds") in the dataset's experiment with every seed's
training run as a child; the parent gets the mean, the standard deviation (n - 1 in the
denominator; 0 for one seed), the minimum and maximum of each test and validation metric
(`seeds/test_H_mean`, ...) and `seeds.json` / `seeds.md`. `jobs/results_table.py --source seeds`
reads the newest such parent.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ray import tune

from dedn import tracking
from dedn.config import RunConfig
from dedn.errors import ConfigError, DednError
from dedn.metrics import METRICS
from dedn.training import driver
from dedn.training.node_cache import start_node_caches
from dedn.training.preflight import open_dataset
from dedn.tuning.sweep import check_trial_resources
from dedn.tuning.trial import DRIVER_CPUS, worker_resources

__all__ = ["SEEDS_KIND", "SeedsSpec", "SeedsSummary", "seed_list", "spread", "run_seeds", "format_seeds"]

SEEDS_KIND = "seeds"
STATS = ("mean", "std", "min", "max")


def seed_list(first: int, n: int) -> list[int]:
    """`n` seeds from `first` on: first, first + 1, ... (the preset's seed is the first)."""
    if n < 1:
        raise ConfigError("--num-seeds", "an int >= 1", n, "reproduce")
    return [first + i for i in range(n)]


@dataclass
class SeedsSpec:
    """One configuration, the seeds to train it with, and each trial's share of the cluster."""

    data: str
    base: RunConfig
    seeds: Sequence[int]
    workers_per_trial: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0  # 0: every seed at once
    name: str = ""
    storage: str = ""  # Ray Train storage of the seeds' runs ("" = $DEDN_HOME/ray_results)
    verbose: int = 1

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--seeds", "one or more distinct seeds", list(self.seeds), "reproduce")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
                raise ConfigError("--seeds", "integers in [0, 2**63)", s, "reproduce")
        if self.workers_per_trial < 1 or not self.cpus_per_trial > 0 or self.max_concurrent_trials < 0:
            raise ConfigError("--workers-per-trial/--cpus-per-trial/--max-concurrent-trials",
                              ">= 1, > 0 and >= 0", (self.workers_per_trial, self.cpus_per_trial,
                                                     self.max_concurrent_trials), "reproduce")
        if not 0 <= self.gpus_per_trial <= self.workers_per_trial:
            raise ConfigError("--gpus-per-trial", f"between 0 and {self.workers_per_trial}", self.gpus_per_trial,
                              "reproduce")


@dataclass(frozen=True)
class SeedsSummary:
    name: str
    parent_run_id: str
    experiment: str
    model: str
    dataset: str
    semi_synthetic: bool
    rows: list[dict[str, Any]]  # per seed: seed, run_id, best_epoch, test_T.., val_T..
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # "test_H" -> {"mean", "std", "min", "max"}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1; 0 for one value), min and max."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def seed_trial(config: dict[str, Any], *, base: dict[str, Any], data: str, name: str, parent_run_id: str,
               experiment: str, workers: int, cpus_per_worker: float, gpus_per_worker: float, storage: str,
               where: Mapping[str, str]) -> None:
    """Tune function trainable: the whole protocol with one seed, tracked as a child of the parent run.

    where: the driver's tracking store and DEDN_HOME. A trial runs in a Ray worker process, whose
    environment is the one Ray started with, not necessarily the driver's now: the child runs
    must land in the parent's store."""
    os.environ.update(where)
    seed = int(config["seed"])
    cfg = RunConfig.from_dict(base, source="reproduce base config").replace(
        **{"optim.seed": seed, "data.path": data, "protocol": "two_phase"})
    settings = driver.TrainSettings(
        num_workers=workers, cpus_per_worker=cpus_per_worker, use_gpu=gpus_per_worker > 0,
        gpus_per_worker=gpus_per_worker, max_failures=1, register=False, track=True, verbose=False,
        storage_path=storage, name=f"{name}-seed{seed}", experiment=experiment, parent_run_id=parent_run_id,
        tags={"seed": str(seed), tracking.KIND_TAG: "seed"})
    out = driver.train(cfg, settings)
    row = {"seed": seed, "run_id": out.run_id, "best_epoch": out.best_epoch}
    row.update({f"test_{k}": float(v) for k, v in (out.test_metrics or {}).items() if k in METRICS})
    row.update({f"val_{k}": float(v) for k, v in (out.val_metrics or {}).items() if k in METRICS})
    tune.report(row)


def run_seeds(spec: SeedsSpec) -> SeedsSummary:
    """Train every seed (Tune trials), then summarise them into the parent run; raises when a seed failed."""
    cfg, dataset = open_dataset(spec.base.replace(**{"data.path": spec.data, "protocol": "two_phase"}))
    name = spec.name or f"seeds-{cfg.model.name}-{cfg.dataset.lower()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    check_trial_resources(spec)  # cpus_per_trial, gpus_per_trial: the same fields as a sweep's
    tracking.init_store()  # the store's tables exist before any trial writes
    experiment = tracking.experiment_name(cfg.dataset)
    params = {"seeds": ",".join(map(str, spec.seeds)), "seeds.workers_per_trial": spec.workers_per_trial,
              "seeds.cpus_per_trial": spec.cpus_per_trial, "seeds.gpus_per_trial": spec.gpus_per_trial,
              **{k: v for k, v in cfg.flat().items()}}
    _, parent = tracking.start_run(name, experiment=experiment, params=params,
                                   tags={tracking.KIND_TAG: SEEDS_KIND, tracking.MODEL_TAG: cfg.model.name,
                                         "dataset": cfg.dataset, "semi_synthetic": str(dataset.semi_synthetic).lower()})
    per_cpu, per_gpu = worker_resources(spec.cpus_per_trial, spec.gpus_per_trial, spec.workers_per_trial)
    fn = tune.with_parameters(seed_trial, base=cfg.to_dict(), data=cfg.data.path, name=name, parent_run_id=parent,
                              experiment=experiment, workers=spec.workers_per_trial, cpus_per_worker=per_cpu,
                              gpus_per_worker=per_gpu, storage=spec.storage,
                              where={"MLFLOW_TRACKING_URI": tracking.tracking_uri(), "DEDN_HOME": str(tracking.dedn_home())})
    storage = Path(spec.storage).expanduser().resolve() if spec.storage else tracking.dedn_home() / "tune"
    tuner = tune.Tuner(
        tune.with_resources(fn, {"CPU": DRIVER_CPUS}),
        param_space={"seed": tune.grid_search(list(spec.seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials or len(spec.seeds)),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=spec.verbose),
    )
    if cfg.data.resident != "off" and cfg.data.resident_shared:
        start_node_caches()  # one decoded copy per node for every seed
    try:
        results = tuner.fit()
        rows, failed = [], []
        for r in results:
            if r.error is not None or "seed" not in (r.metrics or {}):
                failed.append(f"{(r.config or {}).get('seed')}: {str(r.error).splitlines()[0] if r.error else 'no result'}")
            else:
                rows.append({k: r.metrics[k] for k in ("seed", "run_id", "best_epoch", *_metric_keys()) if k in r.metrics})
        if failed:
            raise SeedsFailed(name, failed)
    except BaseException:
        tracking.finish_run(parent, "FAILED")
        raise
    rows.sort(key=lambda row: row["seed"])
    stats = {k: spread([row[k] for row in rows]) for k in _metric_keys() if all(k in row for row in rows)}
    summary = SeedsSummary(name, parent, experiment, cfg.model.name, cfg.dataset, dataset.semi_synthetic, rows, stats)
    tracking.log_metrics(parent, {f"seeds/{k}_{s}": v for k, st in stats.items() for s, v in st.items()})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "seeds.json").write_text(json.dumps(asdict(summary), indent=2))
        (Path(d) / "seeds.md").write_text(format_seeds(summary))
        for f in ("seeds.json", "seeds.md"):
            tracking.log_artifact(parent, Path(d) / f)
    tracking.finish_run(parent)
    return summary


def _metric_keys() -> list[str]:
    return [f"{split}_{k}" for split in ("test", "val") for k in METRICS]


class SeedsFailed(DednError, RuntimeError):
    """Some seeds' runs ended with an error: no mean is reported over the others."""

    def __init__(self, name: str, failed: Sequence[str]):
        self.name, self.failed = name, list(failed)
        super().__init__(f"reproduce {name}: {len(self.failed)} seed(s) failed, no summary written: "
                         + "; ".join(self.failed))


def format_seeds(summary: SeedsSummary, paper: Mapping[str, float] | None = None) -> str:
    """Markdown: a row per seed, mean ± std and min-max of T, U, S, H (test, %), the paper's row if given."""
    fam = summary.model.upper()
    head = "| seed | epoch | " + " | ".join(f"test {k}" for k in METRICS) + " | val H |"
    lines = [f"{fam} on {summary.dataset}, {len(summary.rows)} seed(s) (%)"
             + (" — SEMI-SYNTHETIC data: not a benchmark result" if summary.semi_synthetic else ""), "",
             head, "|---:|---:|" + "---:|" * (len(METRICS) + 1)]
    for row in summary.rows:
        lines.append(f"| {row['seed']} | {row['best_epoch']} | "
                     + " | ".join(f"{100 * row[f'test_{k}']:.1f}" for k in METRICS) + f" | {100 * row['val_H']:.1f} |")
    st = summary.stats
    lines.append("| mean ± std | | " + " | ".join(f"{100 * st[f'test_{k}']['mean']:.1f} ± {100 * st[f'test_{k}']['std']:.1f}"
                                                 for k in METRICS) + f" | {100 * st['val_H']['mean']:.1f} |")
    lines.append("| min – max | | " + " | ".join(f"{100 * st[f'test_{k}']['min']:.1f} – {100 * st[f'test_{k}']['max']:.1f}"
                                                for k in METRICS) + " | |")
    if paper:
        lines.append("| paper (one seed) | | " + " | ".join(f"{paper[k]:.1f}" for k in METRICS) + " | |")
    lines.append("")
    lines.append("std: sample standard deviation (n - 1). Each seed selects its epoch and inference weights on "
                 "validation only.")
    return "\n".join(lines) + "\n"
