"""The one tracking layer: every MLflow call of the project lives in this package.

* `store` — where the store lives (`MLFLOW_TRACKING_URI`, else `sqlite:///<DEDN_HOME>/mlflow.db`),
  experiments with an explicit artifact location, runs (parent and child), params, metrics,
  tags (named constants), and `RunLogger` for logging into an existing run by id;
* `sink` — `MLflowSink`, the training loop's sink (rank 0);
* `registry` — log, register, alias `champion`, load (`Predictor`), models from code;
* `pyfunc_model` — the models-from-code entry file MLflow requires (it imports mlflow too).
"""
from dedn.tracking.store import *  # noqa: F401,F403
from dedn.tracking.store import (  # noqa: F401
    BEST_TRIAL_TAG, FINAL_RUN_TAG, SETTING_TAG, __all__ as _store_all,
)


def __getattr__(name: str):  # the sink and the registry import torch and the model families: load on use
    if name == "MLflowSink":
        from dedn.tracking.sink import MLflowSink

        return MLflowSink
    if name == "registry":
        import importlib

        return importlib.import_module("dedn.tracking.registry")
    raise AttributeError(name)


__all__ = [*_store_all, "BEST_TRIAL_TAG", "FINAL_RUN_TAG", "SETTING_TAG", "MLflowSink", "registry"]
