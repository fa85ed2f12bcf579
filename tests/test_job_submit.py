"""Integration: a job submitted to a `ray start --head` cluster (token auth) logs to the team server.

The README's own block (default store, default ports) is run as written by test_readme_cluster.py;
this test covers what it cannot: the tracking server reached through the job's runtime environment
alone (`jobs/runtime_env.py` in the submitting shell; the cluster's nodes never see the URI or the
credentials), and the dashboard's REST API refusing a request without the token.

Everything lives in tmp: HOME (so ~/.ray/auth_token is the test's own), DEDN_HOME, Ray's temp dir;
ports are free ones on 127.0.0.1. `ray stop` runs in a finally.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HEALTH_CHECK

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_cluster]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _ray(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_job_submit_trains_tracks_and_registers(tmp_path: Path, tiny_dataset, team_server, monkeypatch: pytest.MonkeyPatch):
    """The job reaches the server through its runtime environment alone: the URI and the
    credentials are in the submitting shell only, in no environment the cluster inherits."""
    team = team_server
    home, dedn_home = tmp_path / "home", tmp_path / "dedn_home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(home), DEDN_HOME=str(dedn_home), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **HEALTH_CHECK,
               # the node's workers sample system metrics each second: a 1-epoch run is shorter than MLflow's
               # default interval, and then logged none (seen once in CI)
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    gcs, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"ray-{tmp_path.name[-20:]}"  # Ray's socket paths must stay short
    try:
        # `ray start` with RAY_AUTH_MODE=token does not create the token: generate it first
        gen = _ray(["get-auth-token", "--generate"], env, 60)
        assert gen.returncode == 0, gen.stdout + gen.stderr
        assert (home / ".ray" / "auth_token").exists(), "the token is not under the test's HOME"
        start = _ray(["start", "--head", "--num-cpus=2", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                      f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                      f"--temp-dir={temp}"], env, 120)
        assert start.returncode == 0, start.stdout + start.stderr
        token_file = home / ".ray" / "auth_token"
        token_file.chmod(0o600)  # as the README says: Ray writes it readable by every local user
        # the dashboard's REST API: 401 without the token, answers with it (docs/cluster.md#authentication)
        api = f"http://127.0.0.1:{dash}/api/jobs/"
        assert _http_status(api) == 401
        assert _http_status(api, {"Authorization": f"Bearer {token_file.read_text().strip()}"}) == 200
        shell = {**env, **team.env}  # the submitting shell, after `eval "$(python jobs/server.py env)"`
        runtime_env = subprocess.run([sys.executable, "jobs/runtime_env.py"], env=shell, cwd=ROOT, capture_output=True,
                                     text=True, timeout=60, check=True).stdout
        assert json.loads(runtime_env)["env_vars"].keys() >= {*team.env, "DEDN_GIT_COMMIT", "DEDN_HOME"}
        submit = _ray([
            "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
            "--runtime-env-json", runtime_env, "--", sys.executable, "jobs/train.py", "--data", str(tiny_dataset.root), "--preset", "cub",
            "--num-workers", "1", "epochs=1", "eval.batch_size=64",  # 2 workers on a `ray start` cluster: the README test
        ], env, 240)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
        sid = re.search(r"Job '([^']+)' submitted successfully", log)
        assert sid, log[-2000:]
    finally:
        stop = _ray(["stop", "--force"], env, 60)
        assert stop.returncode == 0, stop.stderr

    # the run and the model version landed in the fixed store under DEDN_HOME
    from mlflow.tracking import MlflowClient

    assert not (dedn_home / "mlflow.db").exists()  # the job logged to the server, not the default store
    for k, v in team.env.items():  # this process's client reads the credentials from the environment
        monkeypatch.setenv(k, v)
    client = MlflowClient(team.uri, registry_uri=team.uri)
    exp = client.get_experiment_by_name("dedn-cub")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:/")
    assert any(m.startswith("system/") for m in client.search_runs([exp.experiment_id])[0].data.metrics)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("ray_job_id") == sid.group(1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags.get("git_commit") == head  # the submitting checkout's, though .git is not uploaded
    assert "test/H" in run.data.metrics and "val/H" in run.data.metrics
    mv = client.get_model_version_by_alias("dedn-cub", "champion")
    assert mv.run_id == run.info.run_id
