"""The MLflow store: creating it, experiments, runs (parent and child), params, metrics, tags, a run logger.

Where the store is (`MLFLOW_TRACKING_URI`, else `sqlite:///<DEDN_HOME>/mlflow.db` with artifacts
under `<DEDN_HOME>/mlartifacts`) is `dedn.tracking.location`; tag and metric names are
`dedn.tracking.names`; a failing store's one-line error is `dedn.tracking.errors`. Team mode is an
MLflow server on PostgreSQL (`dedn.tracking.server`, `jobs/server.py`), with the credentials in
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, which MLflow's client reads from the
environment and which never become params or tags. Browse the local store with
`mlflow ui --backend-store-uri sqlite:///$HOME/.dedn/mlflow.db`.

Experiments are created with an explicit artifact location (MLflow's default is `./mlruns` of the
current directory, which under `ray job submit` is a temporary folder). The driver creates the
store, the experiment and the run (`start_run`) before any Ray worker starts — concurrent first
use of a new sqlite file races — and rank 0 alone logs into that run by id (`RunLogger`).

MLflow itself (about a second to import) is imported where a function first needs it, so that
importing this module, and `dedn.tracking`, costs nothing: the Ray Train workers import the
driver, which imports this, and a run without tracking (a sweep's trial) never loads MLflow.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, cast

from dedn.atomic import file_lock, write_text
from dedn.home import dedn_home
from dedn.provenance import git_commit, ray_job_id
from dedn.tracking.errors import TrackingStoreError, store_errors
from dedn.tracking.location import artifact_root, is_local_store, tracking_uri
from dedn.tracking.mlflow_settings import configure_mlflow
from dedn.tracking.names import MODEL_TAG, PARENT_TAG
from dedn.tracking.probe import check_reachable

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from dedn.config import RunConfig

__all__ = [
    "MAX_PARAM_LENGTH", "RunLogger", "UNFINISHED_DIR", "child_runs", "client", "end_recorded_runs", "find_child_run",
    "finish_run", "get_or_create_experiment", "init_store", "log_artifact", "log_metrics", "log_params",
    "model_version_by_alias", "record_unfinished", "run_tags", "set_tags", "start_run", "system_metrics",
]

MAX_PARAM_LENGTH = 6000  # MLflow 3 accepts up to 6000 characters per param value


class _StoreClient:
    """An MlflowClient whose store failures (`is_store_failure`) are TrackingStoreErrors naming the store;
    MLflow's answers to the request itself (no such run, already exists) pass unchanged."""

    def __init__(self, uri: str):
        configure_mlflow()
        from mlflow.tracking import MlflowClient  # mlflow on first use (module docstring)

        self.tracking_uri = uri
        with store_errors("opening the store", uri):  # a sqlite store is opened (and checked) here
            # registry_uri explicitly: otherwise a registry URI set earlier in this process wins
            self._client = MlflowClient(uri, registry_uri=uri)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with store_errors(name, self.tracking_uri, every=False):
                return attr(*args, **kwargs)

        return call


def client(uri: str | None = None) -> "MlflowClient":
    """An MlflowClient on `uri` (default `tracking_uri()`; the global tracking URI is left alone).

    A failing store raises TrackingStoreError (one line naming the store) instead of MLflow's error.
    """
    return cast("MlflowClient", _StoreClient(uri or tracking_uri()))


def init_store() -> str:
    """Create the store if it does not exist yet (call in the driver before any worker); returns its URI.

    Also makes it the process's MLflow tracking (and registry) URI, so `mlflow.*` calls use it.
    """
    configure_mlflow()
    import mlflow  # on first use (module docstring)

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        # Two first runs at the same moment would both migrate a new sqlite file (one dies in
        # alembic): the first creates the tables under an exclusive lock, the other waits for it.
        with file_lock(db.with_name(db.name + ".lock")), _default_artifact_root(artifact_root()):
            client().search_experiments(max_results=1)  # creates the tables (about 1 s the first time)
    else:
        if uri.startswith(("http://", "https://")):
            check_reachable(uri)  # one quick question: MLflow's client would retry a dead server for minutes
        client().search_experiments(max_results=1)  # fail here on an unreachable store
    end_recorded_runs(uri)
    return uri


UNFINISHED_DIR = "unfinished_runs"  # under DEDN_HOME: runs a failing store kept from being marked ended


def record_unfinished(run_id: str, status: str, uri: str | None = None) -> Path:
    """Note in `<DEDN_HOME>/unfinished_runs/` that run `run_id` of store `uri` should be `status` but
    could not be marked so (the store failed too); the next `init_store` on that store marks it."""
    uri = uri or tracking_uri()
    doc = {"uri": uri, "run_id": run_id, "status": status, "time": time.time()}
    return write_text(dedn_home() / UNFINISHED_DIR / f"{run_id}.json", json.dumps(doc))


def end_recorded_runs(uri: str | None = None) -> list[str]:
    """Mark the runs `record_unfinished` noted for store `uri` with their status; the ids marked.

    A run no longer RUNNING there (ended or continued since) is left as it is; the note goes once
    the store has answered. A store that still fails keeps the note for the next start.
    """
    from mlflow.exceptions import MlflowException  # on use (module docstring)

    uri = uri or tracking_uri()
    folder = dedn_home() / UNFINISHED_DIR
    marked: list[str] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("uri") != uri:
            continue
        try:
            c = client(uri)
            if c.get_run(doc["run_id"]).info.status == "RUNNING":
                c.set_terminated(doc["run_id"], str(doc.get("status") or "FAILED"))
                marked.append(doc["run_id"])
        except TrackingStoreError:  # still failing: the next start tries again
            continue
        except MlflowException:  # the run is gone from the store: nothing to mark
            pass
        path.unlink(missing_ok=True)
    return marked


@contextlib.contextmanager
def _default_artifact_root(root: Path) -> Iterator[None]:
    """While a new sqlite store is created, MLflow's "Default" experiment (id 0) gets its artifacts
    under `root` instead of `./mlruns` of the current directory (Ray's temporary working directory
    under `ray job submit`). MLflow reads the root of a store it opens from this variable (its own
    server sets it the same way); it is set only around the creation."""
    key = "_MLFLOW_SERVER_ARTIFACT_ROOT"
    before = os.environ.get(key)
    os.environ[key] = root.as_uri()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def get_or_create_experiment(name: str) -> str:
    """The id of experiment `name`, created with an explicit artifact location when the store is local."""
    from mlflow.exceptions import MlflowException  # on use (module docstring)

    init_store()
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root() / name).as_uri() if is_local_store(tracking_uri()) else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_tags(cfg: "RunConfig", *, semi_synthetic: bool, data_path: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags every training run carries: dataset, variant, protocol, git commit, Ray job, semi_synthetic."""
    tags = {
        "dataset": cfg.dataset, MODEL_TAG: cfg.model.name, "variant": cfg.variant, "protocol": cfg.protocol,
        "semi_synthetic": str(bool(semi_synthetic)).lower(), "data_path": data_path,
    }
    sha = git_commit()
    if sha:
        tags["mlflow.source.git.commit"] = sha
        tags["git_commit"] = sha
    job = ray_job_id()
    if job:
        tags["ray_job_id"] = job
    tags.update(extra or {})
    return tags


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Params of a run, values cut to MLflow's length limit, in batches of 100 (log_batch's limit)."""
    from mlflow.entities import Param  # on use (module docstring)

    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
    with store_errors(f"logging the params of run {run_id}"):
        c = client()
        for i in range(0, len(items), 100):
            c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Metrics of a run at one step, in one batch."""
    from mlflow.entities import Metric  # on use (module docstring)

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
    with store_errors(f"logging step {step}'s metrics to run {run_id}"):
        client().log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    with store_errors(f"setting tags of run {run_id}"):
        c = client()
        for k, v in tags.items():
            c.set_tag(run_id, k, str(v))


def log_artifact(run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    with store_errors(f"logging artifact {Path(path).name} to run {run_id}"):
        client().log_artifact(run_id, str(path), artifact_path)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    with store_errors(f"marking run {run_id} {status}"):
        client().set_terminated(run_id, status)


def start_run(name: str, *, experiment: str, tags: Mapping[str, str] | None = None, params: Mapping[str, Any] | None = None,
              parent_run_id: str = "") -> tuple[str, str]:
    """Create a run (a child of parent_run_id when given) in the driver. Returns (experiment_id, run_id)."""
    exp_id = get_or_create_experiment(experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client().create_run(exp_id, run_name=name, tags=all_tags)
    if params:
        log_params(run.info.run_id, params)
    return exp_id, run.info.run_id


class RunLogger:
    """Logs into one existing run by id (rank 0 of the Ray Train workers, or the driver).

    Metrics are logged with step = epoch; `skip_through` skips steps already in the store (a
    worker restarted from a checkpoint may redo an epoch it logged before failing), so each
    metric has one history entry per epoch. Every request is one to the store: whatever it
    raises is a TrackingStoreError naming the store (not retried: see `dedn.errors`).
    """

    def __init__(self, run_id: str, uri: str | None = None):
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self.client = client(self.uri)
        self._logged_steps: dict[str, int] = {}

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        return store_errors(f"{what} (run {self.run_id})", self.uri)

    def last_step(self, key: str) -> int:
        """Highest step logged for `key` in this run (-1 when none); cached after the first query."""
        if key not in self._logged_steps:
            with self._errors(f"reading the history of {key}"):
                hist = self.client.get_metric_history(self.run_id, key)
            self._logged_steps[key] = max((m.step for m in hist), default=-1)
        return self._logged_steps[key]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """One history entry per metric and step; steps already logged are skipped."""
        from mlflow.entities import Metric  # on use (module docstring)

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if step > self.last_step(k)]
        with self._errors(f"logging step {step}'s metrics"):
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        for m in batch:
            self._logged_steps[m.key] = int(step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with self._errors("setting tags"):
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._errors(f"logging artifact {artifact_file}"):
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        self.log_text(json.dumps(d, indent=2, sort_keys=True, default=float), artifact_file)

    def log_file(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        with self._errors(f"logging artifact {Path(path).name}"):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table_csv(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows of dicts (same keys) as a CSV artifact."""
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(artifact_file).name
            keys: list[str] = list(rows[0].keys()) if rows else []
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
            parent = str(Path(artifact_file).parent)
            self.log_file(path, None if parent == "." else parent)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every entry of metric `key`, sorted by step."""
        with self._errors(f"reading the history of {key}"):
            return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def finish(self, status: str = "FINISHED") -> None:
        with self._errors(f"marking the run {status}"):
            self.client.set_terminated(self.run_id, status)


def find_child_run(experiment: str, parent_run_id: str, tags: Mapping[str, str]) -> str | None:
    """The id of a child run of `parent_run_id` carrying `tags` (e.g. a resumed sweep's trial), or None."""
    exp = client().get_experiment_by_name(experiment)
    if exp is None:
        return None
    flt = " and ".join([f"tags.`{PARENT_TAG}` = '{parent_run_id}'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())])
    found = client().search_runs([exp.experiment_id], filter_string=flt, max_results=1)
    return found[0].info.run_id if found else None


def child_runs(parent_run_id: str, experiment_id: str) -> list[Any]:
    """Every child run of a parent (MLflow Run objects), oldest first."""
    runs = client().search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                order_by=["attributes.start_time ASC"])
    return list(runs)


def model_version_by_alias(name: str, alias: str) -> Any | None:
    """The registered model version `name@alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException  # on use (module docstring)

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@contextlib.contextmanager
def system_metrics(run_id: str, uri: str | None = None, *, node_id: str | None = None,
                   interval_s: float = 5.0) -> Iterator[None]:
    """Log this node's CPU, memory, disk, network (and GPU, with nvidia-ml-py) use into run `run_id`
    while the block runs, as MLflow's `system/...` metrics (its UI's "System metrics" tab).

    One per node (the training workers' local rank 0): a slow epoch with busy CPUs is compute, one
    with idle CPUs is starved. `node_id` names the node in multi-node runs (`system/<node>/...`).
    MLflow's own variables still apply: MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL (seconds), and
    MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off. A restarted worker continues the steps.
    """
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0", "no"):
        yield
        return
    configure_mlflow()
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # on use (module docstring)

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, node_id=node_id,
                                   tracking_uri=uri or tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
