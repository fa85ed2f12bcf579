"""Where a run comes from: the git commit of the code and the Ray job it ran in (run tags)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["GIT_COMMIT_ENV", "git_commit", "ray_job_id"]

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
    ray = sys.modules.get("ray")  # a Ray this process started or joined is imported already; none is imported here
    try:
        if ray is not None and ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - best effort; a tag is not worth failing a run for
        return None
    return None
