"""The README's cluster path, run as a user types it: its marked block, verbatim, in a fresh HOME.

The block (README "On a cluster", between the `readme-cluster` markers) activates the virtualenv,
creates the Ray token, starts a head node on Ray's default ports and submits the demo job. The test
then pastes the commands the job printed (browse, predict) into the same kind of shell, as the
README says to, and checks what they show: the run with its `ray_job_id` and `git_commit` tags in
the UI's REST API, a predictions file written by the registered model. A `from-images` job on
the same cluster runs beside predict (its decode tasks and backbone actors on the cluster's workers).

On the same cluster, what the README's block does not show (until 2026-12-06 tests/test_job_submit.py,
on a `ray start` cluster of its own, 35 s more): a job submitted, as soon as the cluster answers, from
a shell set up for the team server (`eval "$(python jobs/server.py env)"`) reaches that server through
its runtime environment alone (`jobs/runtime_env.py`; the cluster was started without the URI or the
credentials) and registers there; and the dashboard's REST API refuses a request without the token.
Without PostgreSQL (and without DEDN_REQUIRE_TEAM=1) the block is checked and the test then skips,
naming what was not run.

Nothing of the user's is touched: HOME (so ~/.ray and ~/.dedn) is the test's own, PATH has no
virtualenv until the block activates it. The block uses the default ports (6379, 8265; `mlflow ui`
5000): the test fails early, naming the port, when one is taken.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import cub_source
from imagetree import make_cub_image_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_cluster]

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
BEGIN, END = "<!-- readme-cluster: begin -->", "<!-- readme-cluster: end -->"


def readme_cluster_block() -> str:
    """The bash block between the markers, exactly as the README shows it."""
    text = (ROOT / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README.md: one marked cluster block expected"
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    assert block.startswith("```bash\n") and block.endswith("\n```"), block[:80]
    return block[len("```bash\n"):-len("\n```")]


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _shell(script: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _hint(log: str, label: str) -> str:
    """The command the job printed after `label:`, as a user would copy it from the terminal."""
    lines = [ln.split(f"{label}:", 1)[1].strip() for ln in log.splitlines() if ln.strip().startswith(f"{label}:")]
    assert len(lines) == 1, f"one '{label}:' line expected in the job's output:\n{log[-3000:]}"
    return lines[0]


def _get_json(url: str, timeout: float = 60.0) -> dict:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # still starting
            last = e
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s: {last}")


def _from_images_job(shell_start: str, env: dict[str, str], tmp_path: Path, tree) -> None:
    """`prepare_data.py from-images` submitted as a job: its decode tasks and backbone actors run on the
    cluster's workers, which import the test's backbone from the uploaded working directory."""
    from dedn.data import FeatureDataset

    out = tmp_path / "cub-images"
    job = (f"ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json "
           f"\"$(python jobs/runtime_env.py)\" -- python jobs/prepare_data.py from-images --images {tree.images} "
           f"--res101 {tree.res101} --att-splits {tree.att_splits} --word-vectors {tree.word_vectors} "
           f"--attribute-dir {cub_source()} --name CUB --out {out} --size 32 --backbone tests.backbones:tiny "
           "--no-progress")
    done = _shell(shell_start + job, env, 300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert f"image paths: stripped '{tree.prefix}'" in log, log[-3000:]
    ds = FeatureDataset.open(out)
    assert ds.source == "images" and ds.split("trainval").num_rows == 300


def _team_or_reason(request: pytest.FixtureRequest):
    """The session's team server, or why there is none here (under DEDN_REQUIRE_TEAM=1 the fixture fails
    instead): the README's own block is checked either way."""
    try:
        return request.getfixturevalue("team_server"), None
    except pytest.skip.Exception as e:
        return None, str(e)


def _team_job(shell_start: str, env: dict[str, str], team, data: Path, tmp_path: Path) -> subprocess.Popen:
    """`ray job submit` of a 1-epoch run from a shell set up for the team server (its variables, a
    DEDN_HOME of its own); the runtime environment it submitted is kept in tmp_path/runtime_env.json."""
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in {
        **team.env, "DEDN_HOME": str(tmp_path / "team-dedn-home"),
        # the workers sample system metrics each second: a 1-epoch run is shorter than MLflow's default
        # interval, and then logged none (seen once in CI)
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}.items())
    script = (f"{shell_start}{exports}set -e\nrenv=\"$(python jobs/runtime_env.py)\"\n"
              f"printf %s \"$renv\" > {tmp_path / 'runtime_env.json'}\n"
              "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env-json \"$renv\" -- "
              f"python jobs/train.py --data {data} --preset cub --num-workers 1 epochs=1 eval.batch_size=64")
    return subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _check_team_run(team, log: str, tmp_path: Path, head: str) -> None:
    """The team job's run and model version are on the server, not in a local store."""
    from mlflow.tracking import MlflowClient

    renv = json.loads((tmp_path / "runtime_env.json").read_text())
    assert renv["env_vars"].keys() >= {*team.env, "DEDN_GIT_COMMIT", "DEDN_HOME"}, renv
    assert "succeeded" in log, log[-4000:]
    sid = re.search(r"Job '([^']+)' submitted successfully", log)
    assert sid, log[-2000:]
    assert not (tmp_path / "team-dedn-home" / "mlflow.db").exists()  # the job logged to the server only
    with pytest.MonkeyPatch.context() as mp:  # this process's client reads the credentials from the environment
        for k, v in team.env.items():
            mp.setenv(k, v)
        client = MlflowClient(team.uri, registry_uri=team.uri)
        exp = client.get_experiment_by_name("dedn-cub")
        assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:/")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert any(m.startswith("system/") for m in run.data.metrics)
        assert run.data.tags.get("ray_job_id") == sid.group(1)
        assert run.data.tags.get("git_commit") == head  # the submitting checkout's, though .git is not uploaded
        assert "test/H" in run.data.metrics and "val/H" in run.data.metrics
        assert client.get_model_version_by_alias("dedn-cub", "champion").run_id == run.info.run_id


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.timeout(900)
def test_the_readme_cluster_block_works_as_written(tmp_path: Path, tiny_dataset, request: pytest.FixtureRequest):
    if Path(sys.prefix) != VENV:
        pytest.skip(f"the README's path uses the checkout's .venv (make install); these tests run in {sys.prefix}")
    import ray

    team, no_team = _team_or_reason(request)

    if ray.is_initialized():  # the block's cluster must be the only Ray here (`ray stop` ends every one)
        ray.shutdown()
    taken = [p for p in (6379, 8265, 5000) if _port_taken(p)]
    if taken:
        pytest.fail(f"port(s) {taken} are in use: the README's commands use Ray's and MLflow's default ports")
    home = tmp_path / "home"
    home.mkdir()
    # a fresh login shell's environment: nothing of Ray, MLflow, dedn or any virtualenv
    bin_dir = str(VENV / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "DEDN_", "PYTEST_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HOME=str(home), PATH=path)
    shell_start = "source .venv/bin/activate\nexport RAY_AUTH_MODE=token\n"  # the README's shell set-up
    ui = predicting = stopping = teaming = None
    pool = ThreadPoolExecutor(2)
    block_ended = threading.Event()

    def team_job_once_the_cluster_answers() -> subprocess.Popen | None:
        """The team job goes in as soon as the block's cluster is up: its driver starts beside the block's
        job, and its worker takes a CPU when one is free."""
        while not block_ended.is_set():
            try:
                if _http_status("http://127.0.0.1:8265/api/jobs/") == 401:
                    return _team_job(shell_start, env, team, Path(tiny_dataset.root), tmp_path)
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # not up yet
                pass
            time.sleep(0.5)
        return None

    # the from-images job's image tree (Pillow, CPU) is drawn while the block's job runs
    tree = pool.submit(make_cub_image_tree, cub_source(), tmp_path / "tree") if cub_source() is not None else None
    submitting = pool.submit(team_job_once_the_cluster_answers) if team is not None else None
    try:
        try:
            done = _shell("set -eo pipefail\n" + readme_cluster_block(), env, 600)
        finally:
            block_ended.set()
        teaming = submitting.result() if submitting is not None else None
        log = done.stdout + done.stderr
        (ROOT / "test-artifacts").mkdir(exist_ok=True)  # what the user would see, kept for a look (gitignored)
        (ROOT / "test-artifacts" / "readme-cluster.log").write_text(log)
        assert done.returncode == 0, log[-5000:]
        sid = re.search(r"Job '(raysubmit_[^']+)' succeeded", log)
        assert sid, log[-3000:]
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o077 == 0  # the README's chmod 600
        assert "test       (%):" in log and "registered model dedn-awa2 version 1" in log, log[-3000:]
        # the dashboard's REST API: 401 without the token, answers with it (docs/cluster.md#authentication)
        api = "http://127.0.0.1:8265/api/jobs/"
        assert _http_status(api) == 401
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert _http_status(api, {"Authorization": f"Bearer {token}"}) == 200
        assert team is None or teaming is not None, "the team job was never submitted"

        # the job's hints, pasted into shells set up as the README says. They do not depend on each
        # other, so they run side by side, as a user's terminals would: the UI starts (it takes the
        # longest) while predict runs beside a from-images job on the cluster
        browse, page = _hint(log, "browse"), _hint(log, "run page")
        assert browse.startswith("mlflow ui "), browse
        ui = subprocess.Popen(["bash", "-c", shell_start + "exec " + browse], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        predict = _hint(log, "predict")
        assert predict.startswith("python jobs/predict.py ")  # the activated python, the checkout's script
        predicting = subprocess.Popen(["bash", "-c", shell_start + predict], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if tree is not None:  # from-images runs on the cluster through `ray job submit` as it runs embedded
            _from_images_job(shell_start, env, tmp_path, tree.result())
        out, err = predicting.communicate(timeout=300)
        assert predicting.returncode == 0, out + err
        written = re.search(r"(\d+) predictions -> (\S+)", out)
        assert written and int(written.group(1)) > 0 and Path(written.group(2)).is_file(), out
        assert Path(written.group(2)).is_relative_to(home / ".dedn"), written.group(2)
        if teaming is not None:
            team_log = teaming.communicate(timeout=300)[0]
            assert teaming.returncode == 0, team_log[-4000:]
        # nothing below needs the cluster: it stops while the UI is read
        stopping = subprocess.Popen(["bash", "-c", shell_start + "ray stop --force"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        m = re.fullmatch(r"(http://127\.0\.0\.1:5000)/#/experiments/(\d+)/runs/([0-9a-f]{32})", page)
        assert m, page
        run = _get_json(f"{m.group(1)}/api/2.0/mlflow/runs/get?run_id={m.group(3)}")["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert tags.get("ray_job_id") == sid.group(1)
        assert tags.get("git_commit") == head and len(head) == 40  # the checkout's commit, without .git uploaded
        assert run["info"]["status"] == "FINISHED" and run["info"]["experiment_id"] == m.group(2)
        assert {"val/H", "test/H"} <= {x["key"] for x in run["data"]["metrics"]}
        if team is not None:
            _check_team_run(team, team_log, tmp_path, head)
    finally:
        pool.shutdown(cancel_futures=True)
        if teaming is not None and teaming.poll() is None:
            teaming.kill()
            teaming.communicate()
        if predicting is not None and predicting.poll() is None:  # an assertion above ended the test early
            predicting.kill()
            predicting.communicate()
        if ui is not None:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(30)
        if stopping is None:
            stopping = subprocess.Popen(["bash", "-c", shell_start + "ray stop --force"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = stopping.communicate(timeout=120)
        assert stopping.returncode == 0, out + err
    if team is None:
        pytest.skip(f"the README's block passed; the team-server job was not run: {no_team}")
