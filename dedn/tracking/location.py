"""Where the tracking store is: its URI, the local store's artifact root, a URI fit to print, a run's page.

The store is a fixed, documented place, so runs started directly (`python jobs/train.py`) and
runs submitted to a cluster (`ray job submit`, whose working directory is a Ray temp folder)
land in the same one: `MLFLOW_TRACKING_URI` when set (a server, a database, ...), otherwise
`sqlite:///<DEDN_HOME>/mlflow.db` with artifacts under `<DEDN_HOME>/mlartifacts`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from dedn.home import dedn_home

__all__ = ["LOCAL_UI", "artifact_root", "is_local_store", "redact_uri", "run_page", "tracking_uri"]

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default

_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@/\s]+@")


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, or the sqlite file `<DEDN_HOME>/mlflow.db` (an absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{dedn_home() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Where experiments of the local store keep their artifacts: `<DEDN_HOME>/mlartifacts`."""
    return dedn_home() / "mlartifacts"


def is_local_store(uri: str) -> bool:
    """Whether `uri` is a store in this machine's files (sqlite, a file store), not a server."""
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def redact_uri(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by `***`."""
    return _PASSWORD.sub(r"\1:***@", text)


def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server `uri`, or on `mlflow ui` over a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
