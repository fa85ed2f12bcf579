"""The deterministic error of a run, recorded beside its checkpoints for the restarts.

A worker that raises a non-retryable `DednError` (bad data, a non-finite loss, a failing store)
writes it to `<storage>/<run name>/FATAL_FILE` (`write_fatal`). The driver's controller callback
reads it (`read_fatal`) and stops Ray Train from restarting the group; a restart that happens all
the same re-raises it at once instead of training again; the driver raises it to the user as itself
rather than Ray's wrapper around it.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from dedn import storage
from dedn.errors import DednError, rebuild

__all__ = ["FATAL_FILE", "read_fatal", "write_fatal"]

FATAL_FILE = "fatal_error.json"  # in the run's storage folder: the non-retryable error a worker raised


def write_fatal(path: str | Path, exc: DednError) -> None:
    """The error as data (class, args, attributes), written atomically; the run ends with it."""
    state = {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in exc.__dict__.items()}
    doc = {"module": type(exc).__module__, "qualname": type(exc).__qualname__, "args": [str(a) for a in exc.args],
           "state": state}
    storage.write_text(str(path), json.dumps(doc))  # a path or an object-store URI (dedn.storage)


def read_fatal(path: str | Path) -> DednError | None:
    """The recorded error rebuilt as its own class (dedn classes only); None when there is none."""
    text = storage.read_text(str(path))
    if text is None:
        return None
    doc = json.loads(text)
    cls: Any = DednError
    if str(doc.get("module", "")).startswith("dedn."):
        found = getattr(importlib.import_module(doc["module"]), doc["qualname"], None)
        if isinstance(found, type) and issubclass(found, DednError):
            cls = found
    return rebuild(cls, tuple(doc.get("args", ())), dict(doc.get("state", {})))
