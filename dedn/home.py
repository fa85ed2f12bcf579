"""`DEDN_HOME`: the one folder a user's runs keep their state in (default `~/.dedn`).

The local MLflow store (`mlflow.db`, `mlartifacts/`), Ray Train storage (`ray_results/`), sweeps
(`tune/`), the demo dataset (`data/`), the team server's default folder (`team/`) and the record
of runs a failing store kept RUNNING (`unfinished_runs/`) live under it.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HOME_ENV", "dedn_home"]

HOME_ENV = "DEDN_HOME"


def dedn_home() -> Path:
    """`$DEDN_HOME`, default `~/.dedn`: the MLflow store, Ray Train storage and the demo dataset live here."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".dedn").expanduser().resolve()
