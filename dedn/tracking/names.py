"""The names in the store: tag keys, experiment and registered-model names, the MLflow key of each training metric."""
from __future__ import annotations

from typing import Collection

__all__ = [
    "BEST_TRIAL_TAG", "CHECKPOINT_TAG", "DESCRIPTION_TAG", "DRIVER_TAG", "FINAL_RUN_TAG", "KIND_TAG", "MODEL_TAG",
    "PARENT_TAG", "PERF_METRICS", "REGISTERED_TAG", "SETTING_TAG", "SWEEP_TAG", "TRIAL_TAG", "experiment_name",
    "metric_key", "registered_name",
]

# Tag keys, once. MLflow's own nesting tag makes a run a child in its UI.
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "dedn.kind"  # what made a run that is not a training run: "ablation", "sweep", "comparison"
CHECKPOINT_TAG = "dedn.checkpoint_dir"  # a training run's last Ray Train checkpoint folder
REGISTERED_TAG = "registered_model_version"  # "<name>/<version>" of the model a run registered
SWEEP_TAG = "dedn.sweep"  # the sweep a run belongs to
TRIAL_TAG = "dedn.trial_id"
BEST_TRIAL_TAG = "dedn.best_trial_id"
FINAL_RUN_TAG = "dedn.final_run_id"
SETTING_TAG = "dedn.ablation.setting"
MODEL_TAG = "model"
DRIVER_TAG = "dedn.driver"  # "<host>:<pid>:<process start time>" of the driver that opened the run
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description (Markdown) in MLflow's UI


def experiment_name(dataset: str) -> str:
    return f"dedn-{dataset.lower()}"


def registered_name(dataset: str, model: str = "dedn") -> str:
    """`dedn-cub`, `msdn-cub`: one registered model per (model family, dataset)."""
    return f"{model.lower()}-{dataset.lower()}"


PERF_METRICS = frozenset({"images_per_s", "epoch_time_s", "data_wait_frac", "worker_peak_rss_mib", "data_resident_mib",
                          "worker_peak_gpu_mib"})


def metric_key(name: str, weight_names: Collection[str] = ()) -> str:
    """The MLflow key of a training metric (an `EpochReport.metrics()` name).

    The MLflow UI draws one collapsible section of charts per key prefix before a `/` (in
    alphabetical order, unprefixed keys last), so a run's 30-odd charts come in five groups:
    `val/` (T, U, S, H, best_H and the family's inference weights, chosen on validation), `test/`
    (T, U, S, H), `train/` (the selection phase's loss terms), `final/` (the retraining phase's) and
    `perf/` (throughput, data wait, memory). Names elsewhere (console, Ray Train, Tune) stay flat.
    """
    if name.startswith("best_val_"):
        return "val/best_" + name[len("best_val_"):]
    for prefix in ("val", "test", "final"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1:]}"
    if name in PERF_METRICS:
        return f"perf/{name}"
    return f"val/{name}" if name in weight_names else f"train/{name}"
