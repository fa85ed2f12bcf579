"""The Ray a driver runs on: the cluster the user asked for, else a private embedded one it owns.

An embedded Ray belongs to its driver and must not outlive it. On a normal exit or a SIGTERM
(jobs turn it into an exit) `ray.shutdown` runs at exit. On a SIGKILL nothing in the driver
runs: Ray's GCS and raylet fate-share with it and die at once, their workers with them, but the
two per-node agents (dashboard, runtime-env) wait for one last 60 s GCS call before they exit;
the next embedded start reaps such orphans (`reap_orphaned_agents`) and removes the dead driver's
temp folder (`remove_dead_private_folders`). Ray is imported where it
is used: the driver imports this module, and importing the driver does not load Ray.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from dedn.errors import ClusterError
from dedn.families import FAMILY_MODULES_ENV
from dedn.procs import parent
from dedn.provenance import GIT_COMMIT_ENV, git_commit
from dedn.training.callbacks import PLUGINS_ENV

__all__ = ["init_ray", "cluster_address", "set_continue_hint", "job_runtime_env", "reap_orphaned_agents",
           "remove_dead_private_folders"]

AGENT_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def init_ray(dashboard: bool = False, address: str | None = None) -> None:
    """Join the cluster the user asked for, else start a private embedded Ray; no-op when Ray is up.

    address: an `--address` option (`host:port`, `ray://...`); `auto` means "the running cluster".
    dashboard: give the embedded Ray its dashboard (its State API frees each finished Ray Train
    run's placement group at once; a sweep of TorchTrainer trials needs that).

    A cluster is joined only when asked for, as Ray's own `ray.init()` would find it: `address`,
    `RAY_ADDRESS` (`ray job submit` sets it), or a cluster that `ray start` made on this machine
    (its address file, `/tmp/ray/ray_current_cluster`, naming a GCS that answers). Anything else
    — another run's embedded Ray, say — is not joined: Ray's `address="auto"` would scan the
    process table and join any Ray it finds, and the second run would then die with the first
    (docs/stack-notes.md). The embedded Ray is started with `address="local"`, without the
    dashboard (about 1 GB RSS) unless asked; Ray-internal loggers are raised to ERROR there.
    """
    import ray  # on use (module docstring)

    if ray.is_initialized():
        return
    # ray.init installs Ray core's own SIGTERM handler (it logs a stack and aborts), which would
    # replace the driver's (jobs/train.py: exit cleanly, mark the run KILLED); put the driver's back
    keep_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        _init_ray(dashboard, cluster_address(address))
    finally:
        if callable(keep_sigterm):
            signal.signal(signal.SIGTERM, keep_sigterm)


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to join (`address`, `RAY_ADDRESS`, a live `ray start` cluster here), or None: start a private one."""
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    started = _ray_start_address()
    return started if started and _answers(started) else None


PRIVATE_PREFIX = "dedn-ray-"  # an embedded Ray's temp folder: <tmp>/dedn-ray-<driver pid>


def _ray_start_address() -> str | None:
    """The GCS address `ray start --head` left on this machine (removed again by `ray stop`)."""
    if Path(os.environ.get("RAY_TMPDIR", "")).name.startswith(PRIVATE_PREFIX):
        # inherited from a driver with an embedded Ray (a job or test that starts this process): its
        # address file names that driver's private Ray, which is never joined
        return None
    try:
        from ray._private.utils import read_ray_address  # the file ray.init() itself reads; Ray on use
    except ImportError:  # another Ray layout: its default file
        path = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        return path.read_text().strip() or None if path.is_file() else None
    return read_ray_address() or None


def _answers(address: str, timeout: float = 1.0) -> bool:
    """Whether something listens at host:port (a head killed without `ray stop` leaves its file behind)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _init_ray(dashboard: bool, address: str | None) -> None:
    import ray  # on use (module docstring)

    if address is not None:
        try:
            ctx = ray.init(address=address, log_to_driver=True, runtime_env=_tracking_runtime_env())
        except (ConnectionError, ValueError) as e:  # a named cluster that is not there: say so, start no other
            raise ClusterError(address, f"no Ray cluster answers there ({str(e).splitlines()[0]})") from None
        gcs = (getattr(ctx, "address_info", None) or {}).get("gcs_address") or address
        if not gcs.startswith("ray://"):  # a Ray Client connection has no GCS of ours to watch
            _ClusterWatch(gcs).start()
        return
    # Ray Train 2.60 starts a PreemptionWatcher actor (max_restarts=-1, worker handles as
    # arguments) and Ray core logs an error-level line about it on every run. It only watches
    # node drains, which a single-node embedded Ray never has; real clusters keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for k, v in RAY_TRAIN_ENV.items():  # the embedded Ray's processes inherit this environment
        os.environ.setdefault(k, v)
    quiet = ray.LoggingConfig(log_level="ERROR")  # Ray's INFO/WARNING chatter (start-up, placement-group cleanup)
    # A temp folder of its own: Ray's helpers that look for "the" cluster without an address (Ray
    # Train's placement-group cleaner, the State API) read `$RAY_TMPDIR/ray/ray_current_cluster`, and
    # with several Rays on the machine and no such file they fail ("Found multiple active Ray
    # instances"). Every process of this Ray inherits RAY_TMPDIR, so they find this one.
    private = Path(tempfile.gettempdir()) / f"{PRIVATE_PREFIX}{os.getpid()}"  # short: Ray's socket paths max ~107 chars
    os.environ["RAY_TMPDIR"] = str(private)
    # "local": a new Ray of this process's own, even when others run on the machine
    ctx = ray.init(address="local", include_dashboard=dashboard, log_to_driver=True, logging_config=quiet)
    from ray._private.utils import write_ray_address  # Ray on use (module docstring)

    write_ray_address(ctx.address_info["gcs_address"])  # into the private folder (RAY_TMPDIR)
    # the embedded cluster is this process's: it goes when the driver exits, however it exits
    # (jobs turn SIGTERM into an exit, so atexit runs then too); its folder goes after it
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    atexit.register(ray.shutdown)  # atexit runs last-registered first
    reap_orphaned_agents()
    remove_dead_private_folders()


# ---- a joined cluster that goes away -------------------------------------------------------------
_CONTINUE_HINT: list[str] = []  # what continues the current run (train() sets it: "--name NAME")


def set_continue_hint(hint: str) -> None:
    """What the cluster-lost line tells the user to run again (the driver's `--name`)."""
    _CONTINUE_HINT[:] = [hint]


class _ClusterWatch(threading.Thread):
    """Ends the driver with one line when the cluster it joined stops answering.

    Ray core does not raise in Python when its GCS dies: the driver hangs for 60 s in a reconnect
    loop, then Ray's C++ side logs "Failed to connect to GCS ... The program will terminate" and exits
    the process (measured, Ray 2.60). A daemon thread probing the GCS port ends it within seconds
    instead, saying what happened and how the run continues (the checkpoints and the MLflow run
    are kept; the next start marks an unfinished run KILLED).
    """

    def __init__(self, gcs_address: str, every_s: float = 2.0, misses: int = 3):
        super().__init__(name="dedn-cluster-watch", daemon=True)
        self.address, self.every_s, self.misses = gcs_address, every_s, misses

    def run(self) -> None:
        missed = 0
        while True:
            time.sleep(self.every_s)
            missed = 0 if _answers(self.address) else missed + 1
            if missed >= self.misses:
                break
        hint = _CONTINUE_HINT[0] if _CONTINUE_HINT else "run the same command again"
        os.write(2, (f"error: Ray cluster {self.address} went away (its GCS stopped answering for "
                     f"{self.every_s * self.misses:.0f} s); start it again and {hint}\n").encode())
        os._exit(2)  # Ray's blocking calls cannot be interrupted from Python; its own exit would be 60 s later


TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# an S3-compatible store's endpoint, credentials and region (`--storage-path s3://...`, dedn.storage)
OBJECT_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_DEFAULT_REGION", "AWS_REGION")
# what the workers load beyond dedn: model families and training plugins (dedn.families, dedn.training.callbacks)
PLUGIN_ENV = (FAMILY_MODULES_ENV, PLUGINS_ENV)
# MLflow's own switches for the system metrics rank 0 of each node samples (dedn.tracking.system_metrics)
SYSTEM_METRICS_ENV = ("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
                      "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING")
# where runs land and what they load: the submitting shell's choice, not the node's
FORWARDED_ENV = (*TRACKING_ENV, *OBJECT_STORE_ENV, *PLUGIN_ENV, *SYSTEM_METRICS_ENV, "DEDN_HOME")
# Ray Train gives a worker group 60 s to start, then logs a WorkerGroupStartupTimeoutError traceback and
# starts it again; on a loaded node (a sweep beside a run, 2 cores) a healthy start takes longer. Ray
# Train's controller reads it, so it travels with the job (or is inherited by an embedded Ray).
RAY_TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


def _forwarded_env() -> dict[str, str]:
    env = {k: os.environ.get(k) or v for k, v in RAY_TRAIN_ENV.items()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    if "DEDN_HOME" in env:  # a relative or ~ path means the shell's, not the job's working directory's
        env["DEDN_HOME"] = os.path.abspath(os.path.expanduser(env["DEDN_HOME"]))
    return env


def _tracking_runtime_env() -> dict[str, dict[str, str]] | None:
    """The tracking store and its credentials for the workers of a driver that joins a running cluster.

    Workers of `ray start` nodes do not inherit the driver's shell; under `ray job submit` the job's
    own runtime environment (`job_runtime_env`) already carries them, and an embedded Ray's workers
    inherit them, so only a direct driver on a cluster needs this.
    """
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return None
    env = _forwarded_env()
    return {"env_vars": env} if env else None


def job_runtime_env(checkout: str | os.PathLike[str] | None = None) -> dict[str, dict[str, str]]:
    """The runtime environment of `ray job submit --working-dir .` from this shell (jobs/runtime_env.py).

    A job's driver runs in the environment of the `ray start` that made the node, not in the
    submitting shell's, and its working directory is an upload without `.git` (a Ray default).
    So the job gets the submitting checkout's commit (tag `git_commit`), the tracking store with its
    credentials, DEDN_HOME, the family and plugin modules to load and MLflow's system-metrics
    switches as environment variables (`FORWARDED_ENV`).
    Everything else about the upload is Ray's default: `.git`, `.venv` and whatever `.gitignore`
    names (data, runs, mlruns) stay behind.
    """
    env = _forwarded_env()
    sha = git_commit(Path(checkout) if checkout else Path.cwd())
    if sha:
        env[GIT_COMMIT_ENV] = sha
    return {"env_vars": env} if env else {}


def reap_orphaned_agents(proc: Path = Path("/proc")) -> list[int]:
    """Kill the Ray agents of this user whose raylet is gone (left by a killed driver); their pids.

    Linux only (reads /proc; elsewhere nothing is done). An agent counts as orphaned when its
    parent is no longer a raylet: it is only waiting for a GCS call to time out, and serves nothing.
    """
    if not proc.is_dir():
        return []
    uid, reaped = os.getuid(), []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            if not title.startswith(AGENT_TITLES) or entry.stat().st_uid != uid:
                continue
            # the raylet starts its agents and stays their parent; an agent it left was adopted by init
            # (or a subreaper). Its environment cannot tell: Ray's proctitle overwrites that memory.
            up = str(parent(proc, entry.name))
            if b"raylet" in _read(proc / up / "cmdline").split(b"\0", 1)[0]:
                continue
            os.kill(int(entry.name), signal.SIGKILL)  # it may sit in that GCS call: no SIGTERM handler would run
            reaped.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return reaped


def remove_dead_private_folders(tmp: Path | None = None) -> list[Path]:
    """Remove the temp folders of embedded Rays whose driver is gone (a SIGKILL runs no atexit): this
    user's `<tmp>/dedn-ray-<pid>` whose pid runs nothing and whose Ray's GCS does not answer (a
    driver in another pid namespace sharing /tmp still counts as alive). Sockets and logs, 30-40 MB each."""
    tmp = Path(tmp or tempfile.gettempdir())
    removed = []
    for folder in tmp.glob(f"{PRIVATE_PREFIX}*"):
        pid = folder.name[len(PRIVATE_PREFIX):]
        try:
            if not pid.isdigit() or int(pid) == os.getpid() or folder.stat().st_uid != os.getuid() or not folder.is_dir():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # alive
            except ProcessLookupError:
                pass
            except PermissionError:  # alive, another user's
                continue
            address = folder / "ray" / "ray_current_cluster"  # what `_init_ray` wrote there
            text = address.read_text().strip() if address.is_file() else ""
            if text and _answers(text.splitlines()[0]):
                continue
        except OSError:  # gone meanwhile
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
