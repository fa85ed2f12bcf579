"""Team mode against real services on loopback: PostgreSQL + `mlflow server` (basic auth, proxied
artifacts) started by `dedn.tracking.server`, a 2-worker training run, a 2-trial sweep all at once
(and the same sweep on SQLite), the registry and prediction by `models:/` URI, concurrent
registrations, and the MLflow UI in headless Chromium (screenshots kept under
`test-artifacts/screenshots/`).

Where PostgreSQL's programs (or Chromium, for the browser test) are missing these tests skip with
the reason; `.ci/run` installs both and sets DEDN_REQUIRE_TEAM=1, which turns a skip into a failure.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from conftest import TINY_TRAIN as TINY, Team, SWEEP_TRIALS, registering_processes, sweep_at_once, free_port as _free_port, unavailable as _unavailable

pytestmark = pytest.mark.slow  # PostgreSQL and an MLflow server start for the module
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def team(team_server: Team) -> Team:
    return team_server


@pytest.fixture
def on_server(team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Team:
    """This process's tracking layer points at the team server (DEDN_HOME under tmp_path)."""
    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    for k, v in team.env.items():
        monkeypatch.setenv(k, v)
    return team


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    from base64 import b64encode

    headers = {"Authorization": "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


# ---- the server itself -------------------------------------------------------------------------------
def test_server_asks_for_credentials_and_errors_say_what_to_do(team: Team, monkeypatch: pytest.MonkeyPatch) -> None:
    from dedn.errors import ServerError
    from dedn.tracking import server

    api = f"{team.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(f"{team.uri}/health") == 200
    assert _get(api) == 401  # basic auth is on
    assert _get(api, ("admin", "wrong-password")) == 401
    assert _get(api, ("admin", team.env["MLFLOW_TRACKING_PASSWORD"])) == 200
    assert team.uri.startswith("http://127.0.0.1:")  # loopback unless told otherwise

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(ServerError, match="asks for credentials and they are not set"):
        server.check_reachable(team.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
    with pytest.raises(ServerError, match="were refused"):
        server.check_reachable(team.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team.env["MLFLOW_TRACKING_PASSWORD"])
    server.check_reachable(team.uri)
    with pytest.raises(ServerError, match="no MLflow server answers"):
        server.check_reachable(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(ServerError, match="already runs at"):  # one server per folder
        server.start(team.data_dir, port=_free_port(), pg_port=_free_port())

    # the secrets are private; the server's command line holds no password
    assert (team.data_dir / "secrets.json").stat().st_mode & 0o077 == 0
    cmdline = Path(f"/proc/{team.pid}/cmdline").read_bytes().decode()
    secrets = json.loads((team.data_dir / "secrets.json").read_text())
    assert all(s not in cmdline for s in secrets.values())
    st = server.status(team.data_dir)
    assert st["healthy"] and st["memory_mib"]["mlflow"] > 0


@pytest.mark.timeout(120)
def test_the_command_line_status_env_and_backup(team: Team, tmp_path: Path) -> None:
    """`jobs/server.py status|env|backup` as a user runs them."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "jobs/server.py", *args, "--data-dir", str(team.data_dir)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    st = cli("status")
    assert st.returncode == 0 and json.loads(st.stdout)["healthy"] is True, st.stderr
    env = cli("env")
    assert env.returncode == 0 and f"export MLFLOW_TRACKING_URI={team.uri}" in env.stdout
    assert f"export MLFLOW_TRACKING_PASSWORD={team.env['MLFLOW_TRACKING_PASSWORD']}" in env.stdout.replace("'", "")
    out = cli("backup", "--out", str(tmp_path / "backups"))
    assert out.returncode == 0, out.stderr
    dumps = sorted((tmp_path / "backups").glob("*.dump"))
    assert [d.name.split("-")[0] for d in dumps] == ["mlflow", "mlflow_auth"]
    from dedn.tracking import server

    listing = subprocess.run([server._pg_bin("pg_restore"), "--list", str(dumps[0])], capture_output=True, text=True)
    assert listing.returncode == 0 and "TABLE public runs" in listing.stdout  # a real dump of the runs table
    assert list((tmp_path / "backups").glob("artifacts-*.tar.gz"))
    bad = subprocess.run([sys.executable, "jobs/server.py", "env", "--data-dir", str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no server of this folder runs" in bad.stderr


@pytest.mark.timeout(180)
def test_an_existing_database_by_url(team: Team, tmp_path: Path) -> None:
    """--database-url: no managed PostgreSQL; runs land in that database; its password is on no command line."""
    import psycopg
    from mlflow.tracking import MlflowClient

    from dedn.tracking import server

    st = server.status(team.data_dir)
    pw = json.loads((team.data_dir / "secrets.json").read_text())["db_password"]
    with psycopg.connect(f"postgresql://dedn@127.0.0.1:{st['pg_port']}/postgres", password=pw, autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "elsewhere"')
        conn.execute('CREATE DATABASE "elsewhere"')
    folder = tmp_path / "second"
    info = server.start(folder, port=_free_port(), database_url=f"postgresql://dedn:{pw}@127.0.0.1:{st['pg_port']}/elsewhere")
    try:
        assert info.pg_data is None and info.backend == f"postgresql+psycopg://dedn@127.0.0.1:{st['pg_port']}/elsewhere"
        assert pw not in Path(f"/proc/{info.pid}/cmdline").read_bytes().decode()
        creds = json.loads((folder / "secrets.json").read_text())
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=creds["admin_password"])
        c = MlflowClient(info.uri)
        run = c.create_run(c.create_experiment("external-db"))
        c.log_metric(run.info.run_id, "x", 1.0)
        with psycopg.connect(f"postgresql://dedn@127.0.0.1:{st['pg_port']}/elsewhere", password=pw) as conn:
            assert conn.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()[0] == 1
        assert (folder / "basic_auth.db").exists()  # the user store, beside it
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        assert server.stop(folder) is not None
    assert server.status(team.data_dir)["healthy"]  # the managed PostgreSQL was not touched


def test_a_folder_postgres_cannot_reach_is_refused_by_name(tmp_path: Path) -> None:
    from dedn.errors import ServerError
    from dedn.tracking import server

    if os.geteuid() != 0:
        pytest.skip("only root runs PostgreSQL as another user")
    try:
        server._pg_bin("initdb")
    except ServerError as e:
        _unavailable(str(e))
    private = tmp_path / "private"  # pytest's tmp root is 0700: the postgres user cannot pass through
    with pytest.raises(ServerError, match="cannot reach this folder"):
        server.start(private, port=_free_port(), pg_port=_free_port())
    assert not (private / "server.json").exists()


# ---- jobs against it ---------------------------------------------------------------------------------
def _job(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_two_worker_training_run_registry_and_prediction_through_the_server(team: Team, awa2_tiny: Path,
                                                                           tmp_path: Path) -> None:
    """The training job joins the session's Ray (RAY_ADDRESS), as a job joins a team's cluster: the
    store, its credentials and MLflow's sampling interval reach the workers only by being forwarded."""
    from mlflow.tracking import MlflowClient

    from conftest import ray_join_lines, session_ray_address

    env = {**team.env, "DEDN_HOME": str(tmp_path / "home"), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    out = _job(["jobs/train.py", "--data", str(awa2_tiny), "--num-workers", "2", *TINY],
               {**env, "RAY_ADDRESS": session_ray_address()})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(ray_join_lines(out.stderr)) == 2, out.stderr[-3000:]  # joined: no Ray of its own
    assert "View run" not in out.stdout and "Successfully registered" not in out.stderr  # MLflow's own chatter
    assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing went to the local default store

    os.environ.update(team.env)  # this process's client reads the credentials from the environment
    try:
        c = MlflowClient(team.uri, registry_uri=team.uri)
        exp = c.get_experiment_by_name("dedn-awa2")
        (run,) = c.search_runs([exp.experiment_id])
        rid = run.info.run_id
        assert run.info.status == "FINISHED" and run.data.params["data.path"] == str(awa2_tiny)
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # artifacts go through the server
        # every epoch of every metric the loop logs arrived once (select and final phases, 2 epochs each)
        for key in ("train/loss", "val/H", "val/U", "val/S", "final/loss"):
            steps = sorted(m.step for m in c.get_metric_history(rid, key))
            assert steps == [1, 2], (key, steps)
        # system metrics of the run, sampled on the workers' node
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            hist = c.get_metric_history(rid, key)
            assert len(hist) >= 2 and all(m.value >= 0 for m in hist), key
        # the run's description in the UI: what was selected, and the test T/U/S/H
        note = run.data.tags["mlflow.note.content"]
        assert "Selected on validation: epoch" in note and "**Test**: T " in note and "semi-synthetic" in note
        assert "Registered as `dedn-awa2` version" in note
        # credentials never become params or tags
        secret = team.env["MLFLOW_TRACKING_PASSWORD"]
        assert not any(secret in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])
        assert not any("MLFLOW_TRACKING_PASSWORD" in k for k in [*run.data.params, *run.data.tags])
        # the artifacts, stored by the server in its own destination
        names = {a.path for a in c.list_artifacts(rid)}
        assert {"training_curves.png", "final_metrics.json", "per_class_accuracy.csv"} <= names
        assert list(team.artifacts.rglob("training_curves.png")) and list(team.artifacts.rglob("MLmodel"))
        local = Path(c.download_artifacts(rid, "final_metrics.json", str(tmp_path)))
        assert json.loads(local.read_text())["semi_synthetic"] is True
        # the registry: a version, tagged, with the champion alias
        mv = c.get_model_version_by_alias("dedn-awa2", "champion")
        assert mv.run_id == rid and float(mv.tags["val_H"]) == pytest.approx(run.data.metrics["val/best_H"], abs=1e-12)
    finally:
        for k in team.env:
            os.environ.pop(k, None)

    # prediction by a models:/ URI, the model downloaded through the server; beside it, the results
    # table reading the registry on the server (two users' commands at once)
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    pred = tmp_path / "pred.parquet"
    with ThreadPoolExecutor(2) as pool:
        predicted = pool.submit(_job, ["jobs/predict.py", "--model", "models:/dedn-awa2@champion", "--data", str(awa2_tiny),
                                       "--split", "test_unseen", "--out", str(pred)], env, timeout=180)
        table = pool.submit(_job, ["jobs/results_table.py", "--datasets", "AWA2", "--no-paper-row"], env, timeout=120)
        out = predicted.result()
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert pq.read_table(pred).num_rows == 10 * 4  # AWA2: 10 unseen classes x 4 images
        out = table.result()
        assert out.returncode == 0 and "AWA2" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.timeout(300)
def test_a_server_keeping_artifacts_on_s3_serves_the_registered_model_to_predict(s3_server, awa2_tiny: Path,
                                                                                 tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`jobs/server.py start --artifacts-destination s3://...`: a model registered through the server lands
    in the bucket and `jobs/predict.py` loads it back through the server, without AWS credentials of its
    own; a bucket that is not there is refused by name before anything starts."""
    import tempfile

    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.data.reader import ShardReader
    from dedn.errors import ServerError
    from dedn.families import family_of
    from dedn.tracking import server
    from dedn.training.loop import build_model

    try:
        server._pg_bin("initdb")
    except ServerError as e:
        _unavailable(str(e))
    for k, v in s3_server.env.items():  # the shell that starts the server has the store's variables
        monkeypatch.setenv(k, v)
    root = Path(tempfile.mkdtemp(prefix="dedn-s3-team-", dir="/tmp"))  # PostgreSQL's user must reach it
    root.chmod(0o711)
    with pytest.raises(ServerError, match=r"--artifacts-destination: s3://no-such-bucket/a: the bucket does not exist"):
        server.start(root / "bad", port=_free_port(), pg_port=_free_port(), artifacts_destination="s3://no-such-bucket/a")
    assert not (root / "bad" / "postgres").exists()  # refused before PostgreSQL started

    dest = f"s3://{s3_server.bucket}/mlflow-artifacts"
    info = server.start(root / "srv", port=_free_port(), pg_port=_free_port(), workers=1, artifacts_destination=dest)
    try:
        env = dict(line.removeprefix("export ").split("=", 1) for line in server.env_lines(root / "srv"))
        env = {k: v.strip("'") for k, v in env.items()}
        assert info.artifacts_destination == dest
        # a model registered through the server (an untrained network: the store is the question here)
        for k, v in {**env, "DEDN_HOME": str(tmp_path / "home")}.items():
            monkeypatch.setenv(k, v)
        from dedn import tracking
        from dedn.tracking import registry

        ds = FeatureDataset.open(awa2_tiny)
        cfg = build_config("awa2", [f"data.path={awa2_tiny}"])
        cfg = family_of(cfg).resolve(cfg, ds.class_side)
        run = tracking.start_training_run(cfg, name="s3-artifacts", semi_synthetic=True)
        example = next(iter(ShardReader(ds, "trainval", batch_size=1, shuffle=False))).features.numpy()
        metrics = {"T": 0.1, "U": 0.1, "S": 0.1, "H": 0.1}
        got = registry.register_model(build_model(cfg, ds.class_side, ds.feature_shape), cfg, ds.class_side,
                                      run_id=run.run_id, val_metrics=metrics, test_metrics=metrics,
                                      input_example=example, semi_synthetic=True)
        run.finish("FINISHED")
        assert got.champion
        assert any(k.endswith("/MLmodel") for k in s3_server.keys("mlflow-artifacts/")), "the model is not in the bucket"

        # predict, with the server's variables and no AWS ones: the model comes through the server
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        pred = tmp_path / "pred.parquet"
        out = subprocess.run([sys.executable, "jobs/predict.py", "--model", "models:/dedn-awa2@champion", "--data",
                              str(awa2_tiny), "--split", "test_unseen", "--out", str(pred)], cwd=ROOT, env=client_env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        import pyarrow.parquet as pq

        assert pq.read_table(pred).num_rows == 10 * 4  # AWA2: 10 unseen classes x 4 images
    finally:
        server.stop(root / "srv")
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _register_two(env: dict[str, str], start: "mp.synchronize.Barrier", hs: list[float], out: "mp.Queue") -> None:
    os.environ.update(env)
    from dedn import tracking
    from dedn.tracking.registry import CHAMPION, promote_best

    start.wait()  # every process registers at the same moment
    tracking.init_store()
    c = tracking.client()
    try:
        c.create_registered_model("toy-team")
    except Exception:  # noqa: BLE001 - another process created it first
        pass
    run = c.create_run(tracking.get_or_create_experiment("toy-team"))
    for h in hs:
        # a server accepts only sources inside the given run's artifacts; the versions only need tags here
        mv = c.create_model_version("toy-team", source=f"{run.info.artifact_uri}/model-{h}", run_id=run.info.run_id)
        c.set_model_version_tag("toy-team", mv.version, "val_H", repr(h))
        promote_best("toy-team")
    out.put(str(c.get_model_version_by_alias("toy-team", CHAMPION).version))


@pytest.mark.timeout(240)
def test_concurrent_registrations_leave_champion_on_the_best_validation_h(on_server: Team) -> None:
    hs = [0.31, 0.42, 0.27, 0.39, 0.40, 0.35, 0.42, 0.29]  # 0.42 twice: the earlier version keeps the tie
    ctx = registering_processes()
    start, out = ctx.Barrier(4), ctx.Queue()
    env = {**on_server.env, "DEDN_HOME": os.environ["DEDN_HOME"]}
    procs = [ctx.Process(target=_register_two, args=(env, start, hs[2 * i:2 * i + 2], out)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(200)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    from dedn import tracking

    c = tracking.client()
    versions = c.search_model_versions("name='toy-team'")
    assert len(versions) == 8
    best = min((int(v.version) for v in versions if float(v.tags["val_H"]) == 0.42))
    assert str(c.get_model_version_by_alias("toy-team", "champion").version) == str(best)


# ---- a concurrent sweep, on the server and on SQLite ---------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_of_trials_at_once_loses_nothing_and_matches_sqlite(on_server: Team, awa2_tiny: Path,
                                                                   tmp_path: Path, sqlite_sweep,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest's sweep (SWEEP_TRIALS trials, all at once) against the server; the same sweep on SQLite
    (`sqlite_sweep`, also checked in test_tuning) must end the same."""
    import shutil

    from conftest import poison_test_shards
    from dedn import tracking

    data = tmp_path / "data"
    shutil.copytree(awa2_tiny, data)
    poison_test_shards(data)  # as in the SQLite twin: the sweep never reads them
    a = sweep_at_once(data, "team-sweep", tmp_path)
    c = tracking.client()
    assert c.tracking_uri == on_server.uri
    exp = c.get_experiment_by_name("dedn-awa2-tune")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`dedn.sweep` = 'team-sweep'")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == a.parent_run_id]
    assert len(children) == SWEEP_TRIALS and all(r.info.status == "FINISHED" for r in children)
    for ch in children:  # both epochs of every reported metric of every trial
        for key in ("val/H", "val/U", "val/S", "val/T", "train/loss", "val/lambda_rc", "val/lambda_e", "val/best_H"):
            assert sorted(m.step for m in c.get_metric_history(ch.info.run_id, key)) == [1, 2], (key, ch.info.run_id)
    assert {"best_config.yaml", "summary.json", "hparams.png"} <= {x.path for x in c.list_artifacts(a.parent_run_id)}

    b = sqlite_sweep.summary  # the same sweep on the embedded SQLite store
    assert a.best_params == b.best_params
    assert (a.best_val_H, a.best_epoch, a.weights) == (b.best_val_H, b.best_epoch, b.weights)
    assert sorted((json.dumps(t["params"], sort_keys=True), t["val_H"]) for t in a.trials) == \
        sorted((json.dumps(t["params"], sort_keys=True), t["val_H"]) for t in b.trials)


# ---- what a person sees: the MLflow UI in Chromium -------------------------------------------------
@pytest.mark.timeout(240)
def test_mlflow_ui_shows_the_run_its_plots_and_the_champion(team: Team) -> None:
    """Runs after the training test (file order): opens that run and its registered model."""
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is not installed (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    from mlflow.tracking import MlflowClient

    os.environ.update(team.env)
    try:
        c = MlflowClient(team.uri)
        exp = c.get_experiment_by_name("dedn-awa2")
        if exp is None:
            pytest.fail("the training test's run is not on the server (run the whole module)")
        (run,) = c.search_runs([exp.experiment_id], max_results=1)
        tune_exp = c.get_experiment_by_name("dedn-awa2-tune")  # the sweep test's, when it ran before
        sweeps = c.search_runs([tune_exp.experiment_id], filter_string="tags.`dedn.kind` = 'sweep'") if tune_exp else []
        sweep = sweeps[0] if sweeps else None
    finally:
        for k in team.env:
            os.environ.pop(k, None)
    SHOTS.mkdir(parents=True, exist_ok=True)

    def settle(page: object, drawn: str = ".js-plotly-plot .main-svg") -> None:
        # charts and images load after the text; the page polls for new metrics (auto-refresh), so
        # "network idle" never comes: wait for what is drawn last (a chart's SVG, an image), then a
        # moment for the rest of the page to paint (was a fixed 3 s a page)
        page.locator(drawn).first.wait_for(state="visible", timeout=60_000)  # type: ignore[attr-defined]
        page.wait_for_timeout(700)  # type: ignore[attr-defined]

    base = f"{team.uri}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1300}, http_credentials={
                "username": team.env["MLFLOW_TRACKING_USERNAME"], "password": team.env["MLFLOW_TRACKING_PASSWORD"]}).new_page()

            page.goto(base)
            page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)
            page.get_by_text("semi_synthetic").first.wait_for(timeout=30_000)
            page.get_by_text("Selected on validation").first.wait_for(timeout=30_000)  # the run's description
            page.get_by_text("System metrics").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SHOTS / "run_overview.png"), full_page=True)
            body = page.inner_text("body")
            assert run.info.run_name in body and "Finished" in body and "dedn-awa2" in body
            assert "System metrics" in body and "Model metrics" in body and "Selected on validation" in body

            page.goto(f"{base}/model-metrics")
            # one collapsible section per key prefix (tracking.metric_key), alphabetical, each with its chart count
            section = lambda name: page.locator('[role="button"][aria-expanded]', has_text=re.compile(rf"^{name}\(\d+\)")).first  # noqa: E731
            section("val").wait_for(timeout=60_000)
            settle(page)
            page.screenshot(path=str(SHOTS / "run_metrics.png"), full_page=True)
            sections = re.findall(r"^(final|perf|test|train|val)\n\((\d+)\)$", page.inner_text("body"), flags=re.M)
            assert [s for s, _ in sections] == ["final", "perf", "test", "train", "val"], sections
            # each section holds every metric of its prefix, e.g. val: T U S H, best_H, lambda_rc, lambda_e
            logged = Counter(k.split("/")[0] for k in run.data.metrics if not k.startswith("system/"))
            assert {s: int(n) for s, n in sections} == dict(logged) and dict(sections)["val"] == "7", (sections, logged)
            # the validation section alone: a click on the others' headings collapses them
            for name in ("final", "perf", "test", "train"):
                section(name).get_by_text(name, exact=True).click()
            settle(page)
            page.screenshot(path=str(SHOTS / "run_metrics_val.png"), full_page=True)
            assert [section(n).get_attribute("aria-expanded") for n in ("final", "train", "val")] == ["false", "false", "true"]
            body = page.inner_text("body")  # each chart's legend names its key
            assert "val/H" in body and "val/lambda_rc" in body and "train/align_c" not in body and "perf/" not in body

            image = 'img[src^="blob:"], img[src^="data:image"], img[src*="get-artifact"]'  # an artifact's preview

            def shot(url: str, shows: str, name: str, drawn: str = image) -> str:
                """Open `url`, wait for `shows` and `drawn`, keep a screenshot `name`.png; the page's text."""
                page.goto(url)
                page.get_by_text(shows).first.wait_for(timeout=60_000)
                settle(page, drawn)
                page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
                return page.inner_text("body")

            body = shot(f"{base}/system-metrics", "cpu_utilization_percentage", "run_system_metrics",
                        ".js-plotly-plot .main-svg")
            assert "system_memory_usage_megabytes" in body
            body = shot(f"{base}/artifacts/training_curves.png", "training_curves.png", "run_training_curves")
            assert "training_curves.png" in body and "final_metrics.json" in body
            if sweep is not None:  # the sweep's parent run and its plot
                body = shot(f"{team.uri}/#/experiments/{sweep.info.experiment_id}/runs/{sweep.info.run_id}/artifacts/hparams.png",
                            "hparams.png", "sweep_hparams")
                assert "best_config.yaml" in body and "lambda_curves.png" in body
            body = shot(f"{team.uri}/#/models/dedn-awa2", "champion", "registered_model", "text=Version 1")
            assert "dedn-awa2" in body and "Version 1" in body and "val_H" in body
        finally:
            browser.close()
    for name in ("run_overview", "run_metrics", "run_metrics_val", "run_system_metrics", "run_training_curves", "registered_model",
                 *(["sweep_hparams"] if sweep is not None else [])):
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000, name


# ---- restart keeps everything ------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_stop_and_start_again_keeps_runs_and_models(team: Team) -> None:
    """Last in the module: the runs and models of the tests above survive a clean stop and start."""
    from mlflow.tracking import MlflowClient

    from dedn.tracking import server

    os.environ.update(team.env)
    try:
        c = MlflowClient(team.uri, registry_uri=team.uri)  # explicit: an earlier test set a sqlite registry URI
        before = sorted(r.info.run_id for r in c.search_runs([e.experiment_id for e in c.search_experiments()]))
        models = {m.name for m in c.search_registered_models()}
        st = server.status(team.data_dir)
        assert server.stop(team.data_dir) is not None
        assert server.http_status(f"{team.uri}/health") is None  # the MLflow server is gone ...
        assert not server._pg_running(Path(st["pg_data"]))  # ... and so is PostgreSQL
        assert not server.status(team.data_dir)["running"]
        info = server.start(team.data_dir, port=st["port"], pg_port=st["pg_port"])
        team.pid = info.pid
        c = MlflowClient(team.uri, registry_uri=team.uri)
        after = sorted(r.info.run_id for r in c.search_runs([e.experiment_id for e in c.search_experiments()]))
        assert before and after == before
        assert {m.name for m in c.search_registered_models()} == models and "dedn-awa2" in models
    finally:
        for k in team.env:
            os.environ.pop(k, None)
