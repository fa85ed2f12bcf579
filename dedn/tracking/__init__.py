"""The one tracking layer: every MLflow call of the project lives in this package.

* `store` — creating the store, experiments with an explicit artifact location, runs (parent and
  child), params, metrics, tags, `RunLogger` for logging into an existing run by id, and `system_metrics`;
* `location` — where the store lives (`MLFLOW_TRACKING_URI`, else `sqlite:///<DEDN_HOME>/mlflow.db`),
  a run's page in the UI; `names` — tag keys, experiment names, metric keys; `errors` — a failing
  store's one-line `TrackingStoreError`; `mlflow_settings` — MLflow's own settings, applied on first use;
* `runs` — training runs: start, continue, mark the orphans of a dead driver;
* `server` — team mode: PostgreSQL + `mlflow server` with basic auth and proxied artifacts; `probe`
  asks a server whether it answers;
* `sink` — `MLflowSink`, the training loop's sink (rank 0), with `curves` (its training-curve figure);
* `registry` — log, register, alias `champion`, load a `dedn.inference.Predictor`, models from code;
* `pyfunc_model` — the models-from-code entry file MLflow requires (it imports mlflow too).

Importing this package loads no MLflow (each function imports it on first use).
"""
import importlib

from dedn.home import dedn_home
from dedn.provenance import git_commit, ray_job_id
from dedn.tracking.errors import TrackingStoreError
from dedn.tracking.location import artifact_root, run_page, tracking_uri
from dedn.tracking.names import (
    BEST_TRIAL_TAG, CHECKPOINT_TAG, DESCRIPTION_TAG, DRIVER_TAG, FINAL_RUN_TAG, KIND_TAG, MODEL_TAG, PARENT_TAG,
    REGISTERED_TAG, SETTING_TAG, SWEEP_TAG, TRIAL_TAG, experiment_name, metric_key,
)
from dedn.tracking.runs import Run, mark_orphans, reopen_run, start_training_run
from dedn.tracking.store import (
    MAX_PARAM_LENGTH, RunLogger, child_runs, client, find_child_run, finish_run, get_or_create_experiment, init_store,
    log_artifact, log_metrics, log_params, model_version_by_alias, run_tags, set_tags, start_run, system_metrics,
)


def __getattr__(name: str):  # the sink and the registry import torch and the model families: load on use
    if name == "MLflowSink":
        from dedn.tracking.sink import MLflowSink

        return MLflowSink
    if name == "registry":
        return importlib.import_module("dedn.tracking.registry")
    raise AttributeError(name)


__all__ = [
    "BEST_TRIAL_TAG", "CHECKPOINT_TAG", "DESCRIPTION_TAG", "DRIVER_TAG", "FINAL_RUN_TAG", "KIND_TAG", "MAX_PARAM_LENGTH",
    "MODEL_TAG", "PARENT_TAG", "REGISTERED_TAG", "SETTING_TAG", "SWEEP_TAG", "TRIAL_TAG", "Run", "RunLogger",
    "TrackingStoreError", "artifact_root", "child_runs", "client", "dedn_home", "experiment_name", "find_child_run",
    "finish_run", "get_or_create_experiment", "git_commit", "init_store", "log_artifact", "log_metrics", "log_params",
    "metric_key", "model_version_by_alias", "mark_orphans", "reopen_run", "ray_job_id", "run_page", "run_tags",
    "set_tags", "start_run", "start_training_run", "system_metrics", "tracking_uri", "MLflowSink", "registry",
]
