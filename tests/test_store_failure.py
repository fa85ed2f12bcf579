"""Issue 27, item 4: a tracking store that fails, fails once.

A store that stops taking writes in the middle of a run (its sqlite file made immutable or locked, a
full disk, a server gone) ends the run at once with one `TrackingStoreError` line naming the store:
not retried by Ray Train (it is recorded in the run's fatal-error file), no traceback from MLflow,
SQLAlchemy or Ray, exit code 2. The run is marked FAILED; when that write fails too, the driver
records it under DEDN_HOME and the next start against the store marks it KILLED.

Tests run as root, where file modes do not stop writes: the store is made immutable (`chattr +i`)
where the file system allows it, else locked by another process (`BEGIN EXCLUSIVE`: every write then
fails after MLflow's 20 s busy timeout, so the fallback is slower).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dedn.errors import is_retryable

ROOT = Path(__file__).resolve().parents[1]

def _soak_tool():
    """tools/soak.py, whose store_readonly round makes the store read-only the same way (one helper for both)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dedn_soak_tool", ROOT / "tools" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


read_only_store = _soak_tool().read_only_store


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private DEDN_HOME with the default sqlite store."""
    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_store_that_stops_taking_writes_is_one_line_naming_it_and_the_next_start_ends_the_run(home: Path) -> None:
    from dedn import tracking
    from dedn.tracking.errors import TrackingStoreError
    from dedn.tracking.store import RunLogger, record_unfinished
    from dedn.training.fatal import read_fatal, write_fatal

    uri = tracking.init_store()
    db = home / "mlflow.db"
    assert uri == f"sqlite:///{db}"
    _, run_id = tracking.start_run("ro", experiment="store-failure")
    logger = RunLogger(run_id)  # as rank 0's MLflowSink
    logger.log_metrics({"val/H": 0.25}, step=1)
    mlflow_log = _Records()
    logging.getLogger("mlflow.store.db.utils").addHandler(mlflow_log)
    try:
        with read_only_store(db):
            with pytest.raises(TrackingStoreError) as caught:
                logger.log_metrics({"val/H": 0.5}, step=2)
            with pytest.raises(TrackingStoreError) as finishing:  # the driver marking the run FAILED
                tracking.finish_run(run_id, "FAILED")
            record_unfinished(run_id, "FAILED", uri)
    finally:
        logging.getLogger("mlflow.store.db.utils").removeHandler(mlflow_log)

    e = caught.value
    msg = str(e)
    assert "\n" not in msg and msg.startswith(f"tracking store {uri}: logging step 2's metrics (run {run_id}) failed: ")
    assert "(sqlite3.OperationalError)" in msg, msg  # the database's own words and their type, no SQL
    assert "SELECT" not in msg and "INSERT" not in msg and "sqlalche.me" not in msg
    assert e.uri == uri and not is_retryable(e) and e.__cause__ is None
    assert str(finishing.value).startswith(f"tracking store {uri}: marking run {run_id} FAILED failed: ")
    # as a Ray worker's error reaches the driver, and as a restart finds it in the fatal-error file
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is TrackingStoreError and str(back) == msg and back.reason == e.reason
    write_fatal(home / "fatal_error.json", e)
    again = read_fatal(home / "fatal_error.json")
    assert type(again) is TrackingStoreError and str(again) == msg and not is_retryable(again)
    # MLflow logs each failed statement with its traceback before raising it: dropped, the error says it
    assert mlflow_log.records == []

    # the store takes writes again: the run is still RUNNING until the next start against the store
    c = tracking.client()
    assert c.get_run(run_id).info.status == "RUNNING"
    other = record_unfinished("0" * 32, "FAILED", "sqlite:////elsewhere/mlflow.db")  # another store's: left alone
    tracking.init_store()
    assert c.get_run(run_id).info.status == "FAILED"
    assert not (home / "unfinished_runs" / f"{run_id}.json").exists() and other.exists()
    assert [m.step for m in c.get_metric_history(run_id, "val/H")] == [1]


def test_a_server_that_is_gone_and_answers_that_are_not_failures(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from mlflow.exceptions import MlflowException

    from dedn import tracking
    from dedn.tracking.errors import TrackingStoreError, is_store_failure
    from dedn.tracking.location import redact_uri
    from dedn.tracking.store import RunLogger

    # a server gone: nothing listens there (MLflow's own retries off, or it tries for minutes)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = f"http://dedn:s3cret@127.0.0.1:{port}"
    with pytest.raises(TrackingStoreError) as caught:
        RunLogger("0" * 32, gone).log_metrics({"val/H": 0.5}, step=1)
    msg = str(caught.value)
    assert msg.startswith(f"tracking store http://dedn:***@127.0.0.1:{port}: ") and "\n" not in msg
    assert "s3cret" not in msg and "s3cret" not in repr(caught.value.__dict__)
    assert redact_uri("postgresql://u:pw@db:5432/mlflow") == "postgresql://u:***@db:5432/mlflow"

    # an answer to the request (no such run) is no store failure: callers catching it still do
    tracking.init_store()
    with pytest.raises(MlflowException) as answer:
        tracking.client().get_run("0" * 32)
    assert not isinstance(answer.value, TrackingStoreError) and not is_store_failure(answer.value)
    assert is_store_failure(MlflowException("down", error_code="TEMPORARILY_UNAVAILABLE"))
    assert is_store_failure(ConnectionRefusedError(111, "Connection refused"))


@pytest.mark.slow  # a 2-worker job that joins the session's Ray (RAY_ADDRESS), as a job joins a cluster
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_store_made_read_only_mid_run_ends_the_job_once_with_one_error_line(home: Path, tiny_dataset,
                                                                              tmp_path: Path) -> None:
    """The user's report: the store stops taking writes after epoch 1 of a 2-worker job. Before: the
    epoch was retried by Ray Train's restarts, 1,774 lines of tracebacks, exit 1, no `error:` line, the
    run RUNNING. Rank 1, stopped when rank 0's error ends the group, adds no traceback either."""
    from conftest import ray_join_lines, session_ray_address

    from dedn import tracking
    from dedn.tracking.errors import TrackingStoreError
    from dedn.training.driver import RUN_RECORD_FILE
    from dedn.training.fatal import FATAL_FILE, read_fatal

    epochs = 6  # the store fails in epoch 2 or, on a slow machine, a later one: long before the end
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(tiny_dataset.root), "--preset", "cub",
           f"epochs={epochs}", "optim.max_steps_per_epoch=2", "eval.batch_size=64", "--num-workers", "2",
           "--name", "ro", "--no-register"]
    env = {**os.environ, "RAY_ADDRESS": session_ray_address()}
    run_dir = home / "ray_results" / "ro"
    db = home / "mlflow.db"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    end = time.time() + 300
    while not (run_dir / "select-epoch0001").is_dir():  # epoch 1 is logged before its checkpoint is written
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            pytest.fail(f"the job ended or stalled before epoch 1: {proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    with read_only_store(db):
        out, err = proc.communicate(timeout=400)
    run_id = json.loads((run_dir / RUN_RECORD_FILE).read_text())["run_id"]
    uri = f"sqlite:///{db}"

    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: tracking store {uri}: "), errors[0]
    assert f"run {run_id} is left RUNNING there until the next start against this store marks it KILLED" in errors[0]
    assert "Traceback" not in out + err, (out + err)[-5000:]
    # the error line and at most MLflow's sampler saying it stopped; before them, Ray's two lines of any
    # job that joins a cluster ("Connecting to existing Ray cluster ...", "Connected to Ray cluster ...")
    ray_joined = ray_join_lines(err)
    assert len(ray_joined) == 2, err
    assert len(err.splitlines()) - len(ray_joined) <= 5, err
    # trained once: no epoch was trained (and printed) twice, and the run ended before its last epoch
    # (a joined cluster's worker lines come prefixed with the worker, "(RayTrainWorker pid=...) ")
    trained = [line.split("[select] epoch", 1)[1].split("/")[0] for line in out.splitlines() if "[select] epoch" in line]
    assert len(trained) == len(set(trained)) and 2 <= len(trained) < epochs, out
    recorded = read_fatal(run_dir / FATAL_FILE)  # what each restart re-raised at once, and the driver raised
    assert isinstance(recorded, TrackingStoreError) and recorded.uri == uri

    # the store takes writes again: the run is RUNNING until the next start against the store marks it
    c = tracking.client()
    assert c.get_run(run_id).info.status == "RUNNING"
    assert json.loads((home / "unfinished_runs" / f"{run_id}.json").read_text())["status"] == "KILLED"
    tracking.init_store()
    assert c.get_run(run_id).info.status == "KILLED"
    assert not (home / "unfinished_runs" / f"{run_id}.json").exists()
