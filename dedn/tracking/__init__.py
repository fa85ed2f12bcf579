"""The one tracking layer: every MLflow call of the project lives in this package.

* `store` — where the store lives (`MLFLOW_TRACKING_URI`, else `sqlite:///<DEDN_HOME>/mlflow.db`),
  experiments with an explicit artifact location, runs (parent and child), params, metrics,
  tags (named constants), `RunLogger` for logging into an existing run by id, and `system_metrics`;
* `server` — team mode: PostgreSQL + `mlflow server` with basic auth and proxied artifacts;
* `sink` — `MLflowSink`, the training loop's sink (rank 0);
* `registry` — log, register, alias `champion`, load (`Predictor`), models from code;
* `pyfunc_model` — the models-from-code entry file MLflow requires (it imports mlflow too).
"""
from dedn.tracking.store import (
    BEST_TRIAL_TAG, CHECKPOINT_TAG, DESCRIPTION_TAG, DRIVER_TAG, FINAL_RUN_TAG, KIND_TAG, MAX_PARAM_LENGTH, MODEL_TAG, PARENT_TAG, REGISTERED_TAG,
    SETTING_TAG, SWEEP_TAG, TRIAL_TAG, RunLogger, TrackingStoreError, artifact_root, child_runs, client, dedn_home, experiment_name,
    find_child_run, finish_run, get_or_create_experiment, git_commit, init_store, log_artifact, log_metrics, log_params,
    metric_key, model_version_by_alias, ray_job_id, run_page, run_tags, set_tags, start_run, system_metrics, tracking_uri,
)
from dedn.tracking.runs import Run, mark_orphans, reopen_run, start_training_run


def __getattr__(name: str):  # the sink and the registry import torch and the model families: load on use
    if name == "MLflowSink":
        from dedn.tracking.sink import MLflowSink

        return MLflowSink
    if name == "registry":
        import importlib

        return importlib.import_module("dedn.tracking.registry")
    raise AttributeError(name)


__all__ = [
    "BEST_TRIAL_TAG", "CHECKPOINT_TAG", "DESCRIPTION_TAG", "DRIVER_TAG", "FINAL_RUN_TAG", "KIND_TAG", "MAX_PARAM_LENGTH", "MODEL_TAG", "PARENT_TAG",
    "REGISTERED_TAG", "SETTING_TAG", "SWEEP_TAG", "TRIAL_TAG", "Run", "RunLogger", "TrackingStoreError", "artifact_root", "child_runs",
    "client", "dedn_home", "experiment_name", "find_child_run", "finish_run", "get_or_create_experiment", "git_commit",
    "init_store", "log_artifact", "log_metrics", "log_params", "metric_key", "model_version_by_alias", "mark_orphans", "reopen_run", "ray_job_id", "run_page", "run_tags",
    "set_tags", "start_run", "start_training_run", "system_metrics", "tracking_uri", "MLflowSink", "registry",
]
