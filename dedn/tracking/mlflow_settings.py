"""MLflow's own settings as dedn runs it: quieter logs, no progress bars, no URL printed per run.

MLflow's INFO chatter (schema migration of a new store, input-example validation) and its
artifact-download progress bars drown the training progress; our own lines say what was logged
and registered. Against a tracking server MLflow writes "View run ... at: <url>" to stdout at
every run end; our summary names the run and the server once. A user's own setting of any of
these variables wins.

`configure_mlflow()` applies them once per process, when the store is first used (`client()`,
`init_store()`, `system_metrics()`): nothing is set by importing a module. Processes started
afterwards (an embedded Ray's workers, the team server) inherit the variables.
"""
from __future__ import annotations

import logging
import os
import sys

from dedn.tracking.location import redact_uri

__all__ = ["MLFLOW_DEFAULTS", "configure_mlflow"]

MLFLOW_DEFAULTS = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class _OneLine(logging.Filter):
    """Keeps only the first line of a log message (the store's error without its SQL and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "\n" in msg:
            record.msg, record.args = msg.splitlines()[0][:300], None
        return True


class _StoreLog(logging.Filter):
    """MLflow's database layer: its report of a failed statement dropped, its retries in one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("SQLAlchemy database error"):
            return False
        if msg.startswith("SQLAlchemy engine could not be created") and isinstance(record.args, tuple) \
                and len(record.args) == 2:
            error, delay = record.args
            first = next((line for line in str(error).splitlines() if line.strip()), "")
            record.msg, record.args = "the tracking store could not be opened (%s); MLflow tries again in %.1f s", \
                (redact_uri(first[:300]), delay)
        return True


_configured = False


def configure_mlflow() -> None:
    """Apply MLFLOW_DEFAULTS (where the user set nothing) and dedn's log filters; once per process."""
    global _configured
    if _configured:
        return
    _configured = True
    unset = [key for key in MLFLOW_DEFAULTS if key not in os.environ]
    for key in unset:
        os.environ[key] = MLFLOW_DEFAULTS[key]
    if "MLFLOW_LOGGING_LEVEL" in unset and "mlflow" in sys.modules:  # imported before: its loggers took INFO then
        logging.getLogger("mlflow").setLevel(MLFLOW_DEFAULTS["MLFLOW_LOGGING_LEVEL"])
    # A failed SQL statement (a read-only or locked sqlite file, a full disk, a database gone) is logged
    # by MLflow at ERROR with its whole traceback, 60-odd lines, before MLflow raises the same error;
    # every call into the store then repeats it. The error itself reaches the caller, which dedn turns
    # into one TrackingStoreError line, so that log is only a duplicate: dropped (that message alone).
    # Opening a store that does not answer, MLflow retries for about 100 s, logging each retry with the
    # error's whole text: one line each says it is waiting and why.
    logging.getLogger("mlflow.store.db.utils").addFilter(_StoreLog())
    # MLflow's system-metrics sampler warns once and stops when the store fails, with the error's whole
    # text (the SQL statement and its parameters): its first line says it.
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").addFilter(_OneLine())
