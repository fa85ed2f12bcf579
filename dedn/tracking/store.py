"""The MLflow store: where it lives, experiments, runs (parent and child), tags, and a run logger.

The store is a fixed, documented place, so runs started directly (`python jobs/train.py`) and
runs submitted to a cluster (`ray job submit`, whose working directory is a Ray temp folder)
land in the same one:

* `MLFLOW_TRACKING_URI` when set (a server, a database, ...): team mode is an MLflow server on
  PostgreSQL (`dedn.tracking.server`, `jobs/server.py`), with the credentials in
  `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`, which MLflow's client reads from the
  environment and which never become params or tags;
* otherwise `sqlite:///<DEDN_HOME>/mlflow.db` with artifacts under `<DEDN_HOME>/mlartifacts`,
  `DEDN_HOME` defaulting to `~/.dedn`. Browse it with
  `mlflow ui --backend-store-uri sqlite:///$HOME/.dedn/mlflow.db`.

Experiments are created with an explicit artifact location (MLflow's default is `./mlruns` of the
current directory, which under `ray job submit` is a temporary folder). The driver creates the
store, the experiment and the run (`start_run`) before any Ray worker starts — concurrent first
use of a new sqlite file races — and rank 0 alone logs into that run by id (`RunLogger`).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterator, Mapping, Sequence, cast

from dedn.errors import DednError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from dedn.config import DEDNConfig

__all__ = [
    "dedn_home", "tracking_uri", "artifact_root", "client", "init_store", "get_or_create_experiment", "experiment_name", "start_run", "run_tags", "run_page", "metric_key", "PERF_METRICS", "git_commit", "GIT_COMMIT_ENV", "ray_job_id", "RunLogger", "MAX_PARAM_LENGTH", "log_params", "finish_run", "set_tags", "log_artifact", "log_metrics", "PARENT_TAG", "KIND_TAG", "CHECKPOINT_TAG", "REGISTERED_TAG", "SWEEP_TAG", "TRIAL_TAG", "MODEL_TAG", "find_child_run", "child_runs", "model_version_by_alias", "DRIVER_TAG", "DESCRIPTION_TAG", "system_metrics",
    "TrackingStoreError", "store_errors", "redact_uri", "record_unfinished", "end_recorded_runs",
]

MAX_PARAM_LENGTH = 6000  # MLflow 3 accepts up to 6000 characters per param value

# MLflow's INFO chatter (schema migration of a new store, input-example validation) and its
# artifact-download progress bars drown the training progress; our own lines say what was
# logged and registered. A user's own setting of either variable wins.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Against a tracking server MLflow writes "View run ... at: <url>" to stdout at every run end; our
# summary names the run and the server once.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class TrackingStoreError(DednError, RuntimeError):
    """The tracking store failed a request: read-only, locked, full, a server gone or refusing.

    One line naming the store (its URI without a password) and the reason the store gave. Not
    retried: a restarted worker group would meet the same store, and every restart's traceback
    would bury the reason. `note` says what became of the run (e.g. that it is left RUNNING).
    """

    def __init__(self, uri: object, what: str, reason: str, note: str = ""):
        self.uri, self.what, self.reason, self.note = redact_uri(str(uri)), what, reason, note
        super().__init__(f"tracking store {self.uri}: {what} failed: {reason}" + (f"; {note}" if note else ""))


_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@/\s]+@")


def redact_uri(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` in it replaced by `***`."""
    return _PASSWORD.sub(r"\1:***@", text)


# MLflow error codes of a store that cannot do what it is asked, whatever the request (the rest,
# e.g. RESOURCE_DOES_NOT_EXIST, answer the request itself, and callers catch them on purpose)
_FAILURE_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED", "PERMISSION_DENIED",
                            "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND", "IO_ERROR"})


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e`, what it was raised from, and a database driver's own error (`.orig`), innermost last."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        orig = getattr(x, "orig", None)  # sqlalchemy's DBAPIError keeps the driver's error here
        # not __context__: an answer raised while handling something else (a missing file) is an answer
        x = x.__cause__ or (orig if isinstance(orig, BaseException) else None)


def is_store_failure(e: BaseException) -> bool:
    """Whether `e` (from an MLflow call) says the store itself failed, rather than answering the request.

    A database error (read-only, locked, full, gone), an OSError (a full or read-only artifact
    folder, a refused connection: requests' errors are OSErrors too) or an MlflowException with a
    failure code (MLflow turns SQLAlchemy's OperationalError into TEMPORARILY_UNAVAILABLE).
    """
    for x in _chain(e):
        if isinstance(x, DednError):
            return False
        if isinstance(x, OSError) or type(x).__name__ in ("OperationalError", "DisconnectionError", "InterfaceError"):
            return True
        if str(getattr(x, "error_code", "")) in _FAILURE_CODES:
            return True
    return False


def _reason(e: BaseException) -> str:
    """The store's own words, one line: the innermost error of the chain (a database driver's message
    with its type), else the error's first line; passwords left out."""
    inner = list(_chain(e))[-1]
    text = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    text = re.sub(r"^\((?:[\w.]+)\)\s*", "", text)  # sqlalchemy's "(sqlite3.OperationalError) " prefix
    kind = f"{type(inner).__module__}.{type(inner).__qualname__}".removeprefix("builtins.")
    if len(text) > 300:
        text = text[:297] + "..."
    return redact_uri(f"{text} ({kind})" if text else kind)


@contextlib.contextmanager
def store_errors(what: str, uri: str | None = None, *, every: bool = True) -> Iterator[None]:
    """Inside the block, an error of the tracking store becomes a TrackingStoreError naming the store.

    every=True: any error but a DednError (the block is nothing but a request to the store, so
    whatever it raises is the store refusing it); every=False: only store failures
    (`is_store_failure`), so an MlflowException that answers the request (no such run, already
    exists) reaches callers that catch it on purpose. A TrackingStoreError from a request inside
    (a `client()` call) is named after this block's `what` when every=True.
    """
    try:
        yield
    except TrackingStoreError as e:  # from a client() call inside: named by this, the caller's, request
        if not every:
            raise
        raise TrackingStoreError(e.uri, what, e.reason, e.note) from None
    except DednError:
        raise
    except Exception as e:
        if not every and not is_store_failure(e):
            raise
        # from None: the chain is SQLAlchemy's and MLflow's frames around the reason given here
        raise TrackingStoreError(uri or tracking_uri(), what, _reason(e)) from None


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

# Tag keys, once. MLflow's own nesting tag makes a run a child in its UI.
PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "dedn.kind"  # what made a run that is not a training run: "ablation", "sweep", "comparison"
CHECKPOINT_TAG = "dedn.checkpoint_dir"  # a training run's last Ray Train checkpoint folder
REGISTERED_TAG = "registered_model_version"  # "<name>/<version>" of the model a run registered
SWEEP_TAG = "dedn.sweep"  # the sweep a run belongs to
TRIAL_TAG = "dedn.trial_id"
BEST_TRIAL_TAG = "dedn.best_trial_id"
FINAL_RUN_TAG = "dedn.final_run_id"
SETTING_TAG = "dedn.ablation.setting"
MODEL_TAG = "model"
DRIVER_TAG = "dedn.driver"  # "<host>:<pid>:<process start time>" of the driver that opened the run
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description (Markdown) in MLflow's UI

def dedn_home() -> Path:
    """`$DEDN_HOME`, default `~/.dedn`: the MLflow store, Ray Train storage and the demo dataset live here."""
    return Path(os.environ.get("DEDN_HOME") or Path.home() / ".dedn").expanduser().resolve()


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, or the sqlite file `<DEDN_HOME>/mlflow.db` (an absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{dedn_home() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Where experiments of the local store keep their artifacts: `<DEDN_HOME>/mlartifacts`."""
    return dedn_home() / "mlartifacts"


class _StoreClient:
    """An MlflowClient whose store failures (`is_store_failure`) are TrackingStoreErrors naming the store;
    MLflow's answers to the request itself (no such run, already exists) pass unchanged."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

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


PERF_METRICS = frozenset({"images_per_s", "epoch_time_s", "data_wait_frac", "worker_peak_rss_mib", "data_resident_mib",
                          "worker_peak_gpu_mib"})


def metric_key(name: str, weight_names: Collection[str] = ()) -> str:
    """The MLflow key of a training metric (an `EpochReport.metrics()` name).

    The MLflow UI draws one collapsible section of charts per key prefix before a `/` (in
    alphabetical order, unprefixed keys last), so a run's 30-odd charts come in five groups:
    `val/` (T, U, S, H, best_H and the family's inference weights, chosen on validation), `test/`
    (T, U, S, H), `train/` (the selection phase's loss terms), `final/` (the retraining phase's) and
    `perf/` (throughput, data wait, memory). Names elsewhere (console, Ray Train, Tune) stay flat.
    """
    if name.startswith("best_val_"):
        return "val/best_" + name[len("best_val_"):]
    for prefix in ("val", "test", "final"):
        if name.startswith(prefix + "_"):
            return f"{prefix}/{name[len(prefix) + 1:]}"
    if name in PERF_METRICS:
        return f"perf/{name}"
    return f"val/{name}" if name in weight_names else f"train/{name}"


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server `uri`, or on `mlflow ui` over a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def init_store() -> str:
    """Create the store if it does not exist yet (call in the driver before any worker); returns its URI.

    Also makes it the process's MLflow tracking (and registry) URI, so `mlflow.*` calls use it.
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        # Two first runs at the same moment would both migrate a new sqlite file (one dies in
        # alembic): the first creates the tables under an exclusive lock, the other waits for it.
        with _file_lock(db.with_name(db.name + ".lock")), _default_artifact_root(artifact_root()):
            client().search_experiments(max_results=1)  # creates the tables (about 1 s the first time)
    else:
        if uri.startswith(("http://", "https://")):
            from dedn.tracking.server import check_reachable

            check_reachable(uri)  # one quick question: MLflow's client would retry a dead server for minutes
        client().search_experiments(max_results=1)  # fail here on an unreachable store
    end_recorded_runs(uri)
    return uri


UNFINISHED_DIR = "unfinished_runs"  # under DEDN_HOME: runs a failing store kept from being marked ended


def record_unfinished(run_id: str, status: str, uri: str | None = None) -> Path:
    """Note in `<DEDN_HOME>/unfinished_runs/` that run `run_id` of store `uri` should be `status` but
    could not be marked so (the store failed too); the next `init_store` on that store marks it."""
    from dedn.atomic import write_text

    uri = uri or tracking_uri()
    doc = {"uri": uri, "run_id": run_id, "status": status, "time": time.time()}
    return write_text(dedn_home() / UNFINISHED_DIR / f"{run_id}.json", json.dumps(doc))


def end_recorded_runs(uri: str | None = None) -> list[str]:
    """Mark the runs `record_unfinished` noted for store `uri` with their status; the ids marked.

    A run no longer RUNNING there (ended or continued since) is left as it is; the note goes once
    the store has answered. A store that still fails keeps the note for the next start.
    """
    from mlflow.exceptions import MlflowException

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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX flock), held for the block."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def experiment_name(dataset: str) -> str:
    return f"dedn-{dataset.lower()}"


def get_or_create_experiment(name: str) -> str:
    """The id of experiment `name`, created with an explicit artifact location when the store is local."""
    from mlflow.exceptions import MlflowException

    init_store()
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root() / name).as_uri() if _is_local_store(tracking_uri()) else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


GIT_COMMIT_ENV = "DEDN_GIT_COMMIT"


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The commit of the checkout holding `path` (default: this package), or None outside git.

    Without `path`, $DEDN_GIT_COMMIT wins: Ray leaves `.git` out of a job's uploaded working
    directory, so `jobs/runtime_env.py` puts the submitting checkout's commit in the job's
    environment instead.
    """
    if path is None:
        env = os.environ.get(GIT_COMMIT_ENV, "").strip().lower()
        if len(env) == 40 and all(c in "0123456789abcdef" for c in env):
            return env
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def ray_job_id() -> str | None:
    """The Ray job: its submission id under `ray job submit`, else the driver's job id; None without Ray."""
    # The job supervisor hands the driver its job config, submission id included, in this variable.
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            sid = json.loads(raw).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            sid = None
        if sid:
            return str(sid)
    if os.environ.get("RAY_JOB_ID"):
        return os.environ["RAY_JOB_ID"]
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - best effort; a tag is not worth failing a run for
        return None
    return None


def run_tags(cfg: "DEDNConfig", *, semi_synthetic: bool, data_path: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
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
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
    with store_errors(f"logging the params of run {run_id}"):
        c = client()
        for i in range(0, len(items), 100):
            c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Metrics of a run at one step, in one batch."""
    from mlflow.entities import Metric

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
        from mlflow.entities import Metric

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
    from mlflow.exceptions import MlflowException

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
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, node_id=node_id,
                                   tracking_uri=uri or tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
