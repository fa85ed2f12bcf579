"""Asking a tracking server over HTTP, once and quickly: is it there, does it take our credentials.

The client side of team mode (`dedn.tracking.server` is the server side): `init_store` asks
before MLflow's own client would retry a dead server for minutes.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from base64 import b64encode
from typing import Mapping

from dedn.errors import ServerError

__all__ = ["auth_header", "check_reachable", "http_status"]


def auth_header(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}


def http_status(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5) -> int | None:
    """The HTTP status of a GET (None when nothing answers)."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return None


def check_reachable(uri: str, timeout: float = 5) -> None:
    """Fail fast, with what to do, when the tracking server at `uri` does not answer or refuses our credentials.

    MLflow's own client retries a dead server for minutes; this asks once.
    """
    base = uri.rstrip("/")
    if http_status(f"{base}/health", timeout=timeout) is None:
        raise ServerError("MLFLOW_TRACKING_URI", f"no MLflow server answers at {uri} (is it started? "
                                                 "`python jobs/server.py status` tells)")
    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = auth_header(user, pw) if user and pw else {}
    code = http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers, timeout)
    if code in (401, 403):
        said = "were refused" if headers else "are not set"
        raise ServerError("MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD",
                          f"the MLflow server at {uri} asks for credentials and they {said}; "
                          "`eval \"$(python jobs/server.py env)\"` sets them for the team server")
