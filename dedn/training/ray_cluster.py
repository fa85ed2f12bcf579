"""The Ray a driver runs on: a running cluster when there is one, else an embedded one it owns.

An embedded Ray belongs to its driver and must not outlive it. On a normal exit or a SIGTERM
(jobs turn it into an exit) `ray.shutdown` runs at exit. On a SIGKILL nothing in the driver
runs: Ray's GCS and raylet fate-share with it and die at once, their workers with them, but the
two per-node agents (dashboard, runtime-env) wait for one last 60 s GCS call before they exit;
the next embedded start reaps such orphans (`reap_orphaned_agents`).
"""
from __future__ import annotations

import atexit
import os
import signal
import threading
from pathlib import Path

__all__ = ["init_ray", "job_runtime_env", "reap_orphaned_agents", "descendants", "running"]

AGENT_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def init_ray(dashboard: bool = False) -> None:
    """Connect to a running cluster (`ray job submit`, `ray start`), else start an embedded one.

    dashboard: give the embedded Ray its dashboard (its State API frees each finished Ray Train
    run's placement group at once; a sweep of TorchTrainer trials needs that).

    `address="auto"` joins a cluster when there is one (`ray job submit` sets RAY_ADDRESS; `ray
    start` leaves its address on the node); otherwise an embedded Ray starts, without the
    dashboard (about 1 GB RSS) unless asked. Ray-internal loggers are raised to ERROR there
    (docs/stack-notes.md#ray-connecting-and-authentication: the placement-group cleaner's
    once-a-second warning); our progress lines are written to stdout, not logged, so they
    still show.
    """
    import ray

    if ray.is_initialized():
        return
    # ray.init installs Ray core's own SIGTERM handler (it logs a stack and aborts), which would
    # replace the driver's (jobs/train.py: exit cleanly, mark the run KILLED); put the driver's back
    keep_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        _init_ray(dashboard)
    finally:
        if callable(keep_sigterm):
            signal.signal(signal.SIGTERM, keep_sigterm)


def _init_ray(dashboard: bool) -> None:
    import ray

    try:
        ray.init(address="auto", log_to_driver=True, runtime_env=_tracking_runtime_env())
    except ConnectionError:
        if os.environ.get("RAY_ADDRESS"):  # a named cluster that is not there: say so, do not start another
            raise
        # Ray Train 2.60 starts a PreemptionWatcher actor (max_restarts=-1, worker handles as
        # arguments) and Ray core logs an error-level line about it on every run. It only watches
        # node drains, which a single-node embedded Ray never has; real clusters keep it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        quiet = ray.LoggingConfig(log_level="ERROR")  # Ray's INFO/WARNING chatter (start-up, placement-group cleanup)
        if dashboard:
            ray.init(log_to_driver=True, logging_config=quiet)
        else:
            ray.init(include_dashboard=False, log_to_driver=True, logging_config=quiet)
        # the embedded cluster is this process's: it goes when the driver exits, however it exits
        # (jobs turn SIGTERM into an exit, so atexit runs then too)
        atexit.register(ray.shutdown)
        reap_orphaned_agents()


TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
FORWARDED_ENV = (*TRACKING_ENV, "DEDN_HOME")  # where runs land: the submitting shell's choice, not the node's


def _forwarded_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
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
    credentials and DEDN_HOME as environment variables. Everything else about the upload is Ray's
    default: `.git`, `.venv` and whatever `.gitignore` names (data, runs, mlruns) stay behind.
    """
    from dedn.tracking.store import GIT_COMMIT_ENV, git_commit

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
            parent = str(_parent(proc, entry.name))
            if b"raylet" in _read(proc / parent / "cmdline").split(b"\0", 1)[0]:
                continue
            os.kill(int(entry.name), signal.SIGKILL)  # it may sit in that GCS call: no SIGTERM handler would run
            reaped.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return reaped


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


# ---- /proc (Linux) -----------------------------------------------------------------------------
def _parent(proc: Path, pid: str) -> int:
    return int((proc / pid / "stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """Every process below `pid` (children, theirs, ...); [] where there is no /proc."""
    parent: dict[int, int] = {}
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = _parent(proc, entry.name)
            except (OSError, IndexError, ValueError):  # gone meanwhile
                pass
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        kids = [c for c, pp in parent.items() if pp == cur]
        out += kids
        todo += kids
    return out


def running(pids: list[int], proc: Path = Path("/proc")) -> list[int]:
    """The pids among `pids` that still run (zombies, already dead, do not count)."""
    out = []
    for pid in pids:
        try:
            if (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
        except (OSError, IndexError):
            pass
    return out
