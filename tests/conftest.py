"""Shared fixtures: a seeded RNG for every test and a tiny semi-synthetic CUB-derived dataset."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# real class-side files: ../shared/data beside the checkout (CI lays it there); the packaged asset otherwise
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CUB_SOURCE = SHARED_DATA / "CUB"


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


# ---- one Ray for the whole session --------------------------------------------------------------------
TESTS = Path(__file__).resolve().parent
# How often Ray Train's controller polls its workers (Ray's default 2 s; the jobs set 0.5 s). The tests'
# runs are one or two workers on one node, where a run's start and end wait on these polls: at 0.1 s a
# 1-worker run took 11.3 s instead of 12.6 s, with the same CPU time (docs/development.md#tests).
# Exported here, so every job a test starts inherits it (the jobs only set a default).
HEALTH_CHECK = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
os.environ.update(HEALTH_CHECK)
RAY_ENV = {  # the session Ray's processes inherit these
    "RAY_USAGE_STATS_ENABLED": "0",
    **HEALTH_CHECK,
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",  # tiny epochs: noise
    # as a job's embedded Ray has it (dedn.training.ray_cluster): one actor less per run, which on
    # one node only ever watches for node drains
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def _start_ray() -> None:
    """An embedded Ray as a job starts its own (`init_ray`), unless one is up.

    A private temp folder with its own address file, so no job a test starts joins it, and Ray's
    helpers find it there. Unlike a job's: 2 CPUs (the CI machine's, whatever this one has), the
    dashboard (a sweep's finished trials give their CPUs back at once only through its State API),
    workers' output not forwarded (it would land in whichever test's capture is open), tests/ on the
    workers' path (the faults plugin).
    """
    import os
    import tempfile

    import ray
    from ray._private.utils import write_ray_address

    from dedn.training.ray_cluster import PRIVATE_PREFIX

    if ray.is_initialized():
        return
    os.environ.update(RAY_ENV)
    if str(TESTS) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["RAY_TMPDIR"] = str(Path(tempfile.gettempdir()) / f"{PRIVATE_PREFIX}{os.getpid()}")
    # the dashboard on a free port: Ray's default (8265) stays free for the clusters tests start beside it
    # (`make test-fast`'s other process, a three-node cluster)
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=free_port(),
                   log_to_driver=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
    write_ray_address(ctx.address_info["gcs_address"])


def _stop_ray() -> None:
    """Shut the embedded Ray down and kill its two agents at once: they would wait a last 60 s for
    the gone GCS, holding their ports (the README test's `ray start` then found "No available agent")."""
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
        from dedn.training.ray_cluster import reap_orphaned_agents

        reap_orphaned_agents()


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for every in-process Ray test (marker `ray`), shut down at the session's end.

    Until 2026-12-05 each module started its own (a start, a stop and a slow first run each): one
    Ray for the session had once seen the team server's sweep hang in Tune. That hang was
    Tune's report callback (dedn/tuning/trial.py, `_train_reporting_to_tune`), not the shared Ray;
    since 2026-12-06 the sweeps run on it too. Own-cluster tests run last.
    """
    import shutil
    import tempfile

    from dedn.training.ray_cluster import PRIVATE_PREFIX

    _start_ray()
    yield
    _stop_ray()
    # Its private temp folder (sockets, logs: 30-40 MB), as a job's embedded Ray removes its own; only
    # now: the three-node cluster (tests/test_multinode.py) runs in the same folder (RAY_TMPDIR), after
    # this process's own Ray was stopped, and a `_stop_ray` between its tests only disconnects from it.
    shutil.rmtree(Path(tempfile.gettempdir()) / f"{PRIVATE_PREFIX}{os.getpid()}", ignore_errors=True)


def session_ray_address() -> str:
    """The session Ray's GCS address, for a job a test starts as a subprocess to join (`RAY_ADDRESS`),
    as a user's job joins a running cluster: no Ray start and stop of its own (about 8 s a job,
    measured). Jobs whose own embedded Ray is the point (tests/test_many_runs.py, test_crash.py,
    test_wheel.py, the README's block) start theirs."""
    import ray

    _start_ray()
    return ray.get_runtime_context().gcs_address


def ray_join_lines(output: str) -> list[str]:
    """Ray's two INFO lines of a driver that joins a running cluster ("Connecting to existing Ray
    cluster at address ...", "Connected to Ray cluster ..."): how a test sees that its job joined."""
    return [line for line in output.splitlines()
            if "Connecting to existing Ray cluster" in line or "Connected to Ray cluster" in line]


@pytest.fixture(autouse=True)
def _one_ray(request: pytest.FixtureRequest):
    """`ray` tests run on the session's Ray; `own_cluster` tests on none (it is stopped before them).
    Any other test must leave Ray as it found it: one that starts Ray unmarked fails, naming itself."""
    import sys

    own = request.node.get_closest_marker("own_cluster") is not None
    if own:
        _stop_ray()
    elif request.node.get_closest_marker("ray") is not None:
        request.getfixturevalue("ray_session")
        _start_ray()  # again, if a test stopped it
    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    after = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if after and not before and not own:
        _stop_ray()
        pytest.fail("this test started Ray of its own: mark it `ray` (the session's Ray) or `own_cluster`")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that start clusters of their own run last, in their files' order: the session's Ray is
    stopped once for them, not once per such test among the others. Just before them run the tests
    that restart the session's Ray with variables of their own (marker `restarts_ray`): after them
    no test needs it back, which saves a start and a stop (4.3 to 5.0 s measured)."""
    def rank(item: pytest.Item) -> int:
        return 2 if item.get_closest_marker("own_cluster") else 1 if item.get_closest_marker("restarts_ray") else 0

    items.sort(key=rank)  # stable: each group in its files' order


# ---- subprocess work a slow test starts when the session starts -----------------------------------
# What the early work's subprocesses add to their environment. They run at the lowest priority and lose
# their core all the time: an OpenMP thread (torch's) spinning at a barrier while its partner waits for a
# core burns CPU the other tests could use. The device check's dry run beside one busy process at nice 0:
# 164 core-s and 166 s by default, 45 and 45 s with passive waits (measured 2026-12-06).
EARLY_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_EARLY: dict[str, tuple[object, Path]] = {}  # test node id -> (concurrent.futures.Future of its work, its folder)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the work of each selected test marked `early(work)`: `work(folder)` runs in a thread of this
    process from the start of the session and returns what the test checks (fixture `early_result`).

    For a test that is a chain of subprocesses waiting on each other (build, install, a job with a Ray
    of its own), one core stays idle all along; started first, it runs beside the other tests (the
    wheel's 28 s, 25 of them on an idle core, measured 2026-12-06) instead of after them. The work
    must not depend on the session's state (its own folder, its own environment, no `RAY_ADDRESS`),
    and should only wait on subprocesses (this thread runs at a lower priority, holding the GIL little),
    started with `EARLY_ENV` in their environment.
    Not under pytest-xdist (each process would start it): there the test runs its work itself."""
    import sys
    import tempfile
    import threading
    from concurrent.futures import Future

    option = session.config.option
    if hasattr(session.config, "workerinput") or getattr(option, "numprocesses", None) or option.collectonly:
        return
    for item in session.items:
        marker = item.get_closest_marker("early")
        if marker is None:
            continue
        future: Future = Future()
        folder = Path(tempfile.mkdtemp(prefix="dedn-early-"))

        def run(work=marker.args[0], future=future, folder=folder) -> None:
            try:
                # niced to the lowest priority (Linux: this thread, and every process it starts
                # inherits it): the work takes the cores the other tests leave idle rather than slowing
                # them. Below Ray's own workers, which Ray runs at nice 15: at nice 10 it made the
                # session's first test, a Ray job, take 51-57 s instead of 27; at 19, 30 s.
                if sys.platform.startswith("linux"):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                future.set_result(work(folder))
            except BaseException as e:  # noqa: BLE001 - handed to the test, which raises it
                future.set_exception(e)

        threading.Thread(target=run, name=f"early:{item.name}", daemon=True).start()
        _EARLY[item.nodeid] = (future, folder)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The early work's folders (a wheel, its install, a job's store), once their work has ended."""
    import shutil

    for future, folder in _EARLY.values():
        if future.done():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def early_result(request: pytest.FixtureRequest, tmp_path: Path):
    """What the test's `early(work)` returned: started with the session (`pytest_collection_finish`),
    or run now when it was not (pytest-xdist)."""
    started = _EARLY.get(request.node.nodeid)
    if started is None:
        return request.node.get_closest_marker("early").args[0](tmp_path)
    return started[0].result()


def pytest_report_header(config: pytest.Config) -> str:
    """Say at the top of every run where the class-side data come from: no silent fallback."""
    if SHARED_DATA.is_dir():
        return f"class-side data: {SHARED_DATA} (the real xlsa17 files)"
    return (f"class-side data: NOTE {SHARED_DATA} is missing: the packaged class sides stand in, and the "
            "tests that need the real files are skipped")


def cub_source() -> Path | None:
    return CUB_SOURCE if (CUB_SOURCE / "att_splits.mat").exists() else None


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A FeatureDataset on the real CUB class side: C=16, 2x2 maps, 2 images per class and split.

    Small enough for engine and distributed smoke tests (trainval 300 rows, train 200 rows).
    """
    from dedn.data import FeatureDataset
    from dedn.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("tiny") / "cub_tiny"
    write_synthetic(root, "CUB", cub_source(), channels=16, height=2, width=2, images_per_class=2, seed=0,
                    progress=False)
    return FeatureDataset.open(root)


# ---- team mode: a real PostgreSQL + MLflow server on loopback, one per test session ----------------
def unavailable(why: str) -> None:
    """Skip a team-mode test whose services cannot run here; under DEDN_REQUIRE_TEAM=1 (CI) fail instead."""
    import os

    if os.environ.get("DEDN_REQUIRE_TEAM") == "1":
        pytest.fail(f"team-mode test cannot run: {why}")
    pytest.skip(why)


def registering_processes():
    """A multiprocessing context for tests that register from several processes at once (as separate jobs
    would): each process is forked from one server process that imported MLflow and dedn.tracking once,
    with nothing of the store opened, instead of a new interpreter importing them again (spawn: 4
    processes took 8.2 s and 16 core-s, here 3.0 s for the first 4, measured 2026-12-06). The server is
    started on first use and kept for the session."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dedn.tracking", "dedn.tracking.registry"])  # no effect once it runs
    return ctx


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Team:
    uri: str
    data_dir: Path
    env: dict[str, str]  # MLFLOW_TRACKING_URI and the credentials, as `jobs/server.py env` prints them
    artifacts: Path
    pid: int


@pytest.fixture(scope="session")
def team_server() -> Team:
    """`dedn.tracking.server.start` in a fresh folder on free ports; stopped and removed after the session."""
    import shutil
    import tempfile

    from dedn.errors import ServerError
    from dedn.tracking import server

    try:
        server._pg_bin("initdb")
        server._pg_bin("pg_ctl")
    except ServerError as e:
        unavailable(str(e))
    # as root PostgreSQL runs as `postgres`: a folder that user can reach (pytest's tmp root is private)
    root = Path(tempfile.mkdtemp(prefix="dedn-team-", dir="/tmp"))
    root.chmod(0o711)
    info = server.start(root / "srv", port=free_port(), pg_port=free_port(), workers=2)
    env = dict(line.removeprefix("export ").split("=", 1) for line in server.env_lines(root / "srv"))
    env = {k: v.strip("'") for k, v in env.items()}
    try:
        yield Team(info.uri, root / "srv", env, Path(info.artifacts_destination), info.pid)
    finally:
        server.stop(root / "srv")
        shutil.rmtree(root, ignore_errors=True)


# ---- an S3-compatible store on loopback (moto's server mode) ---------------------------------------------
S3_BUCKET = "dedn-test"


@dataclass
class S3:
    env: dict[str, str]  # AWS_ENDPOINT_URL, credentials, region: what a user's shell would set
    bucket: str

    def keys(self, prefix: str) -> set[str]:
        """The bucket's object keys under `prefix`, without it."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name=self.env["AWS_DEFAULT_REGION"],
                              aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port with one bucket, for the session (the test extra has moto)."""
    with moto_s3() as s3:
        yield s3


@contextmanager
def moto_s3(check_credentials: bool = False):
    """moto's S3 server on a free loopback port with one bucket. `check_credentials`: moto then checks every
    request's key against its IAM users; the one user, its key (in the S3 returned), its S3 policy and the
    bucket are made in the first four requests, which moto lets through unchecked."""
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("moto", reason="moto (the test extra) provides the loopback S3 server")
    import boto3

    port = free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "4"} if check_credentials else {})}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "dedn",
           "AWS_SECRET_ACCESS_KEY": "dedn-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:  # a TCP connection is no request: the unchecked ones are kept for the set-up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)

        def client(service: str):
            return boto3.client(service, endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=aws["AWS_DEFAULT_REGION"],
                                aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                                aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"])

        if check_credentials:
            iam = client("iam")
            iam.create_user(UserName="dedn")
            key = iam.create_access_key(UserName="dedn")["AccessKey"]
            iam.put_user_policy(UserName="dedn", PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
            aws.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        for attempt in range(50):
            try:
                client("s3").create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # the HTTP side still starting
                if attempt == 49 or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield S3(aws, S3_BUCKET)
    finally:
        server.terminate()
        server.wait(30)


# ---- one sweep shared by test_tuning (its assertions) and test_team (the same sweep on the server) ----
SWEEP_TRIALS = 2  # the SQLite/server twins, all at once: trials writing to the store together (3 until 2026-12-06, 8 before)
TINY_TRAIN = ["optim.epochs=2", "optim.max_steps_per_epoch=2", "optim.batch_size=16", "eval.batch_size=512"]


@pytest.fixture(scope="session")
def awa2_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AWA2's real class side (85 attributes, 50 classes) with 16 x 2 x 2 synthetic maps, 4 images per class and split."""
    from dedn.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("awa2") / "awa2"
    with pytest.warns(UserWarning, match="negative values"):  # AWA2's -1 missing-value marks are clamped
        return Path(write_synthetic(root, "AWA2", channels=16, height=2, width=2, images_per_class=4, progress=False))


def poison_test_shards(root: Path) -> dict[Path, bytes]:
    """Replace every test shard by garbage and date its access time back: any read changes one or fails."""
    import json
    import os

    manifest = json.loads((root / "dataset.json").read_text())
    poisoned = {}
    for split in ("test_seen", "test_unseen"):
        for shard in manifest["splits"][split]["shards"]:
            p = root / shard["file"]
            junk = b"not a parquet file; the sweep must never read the test split\n" * 4
            p.write_bytes(junk)
            os.utime(p, (1_000, 2_000))  # atime < mtime: relatime updates atime on the next read
            poisoned[p] = junk
    return poisoned


def sweep_at_once(data: Path, name: str, storage: Path, trials: int = SWEEP_TRIALS) -> object:
    """`trials` trials, all at once, Optuna seed 3; ASHA's grace period = the epochs, so no trial is stopped
    early and the outcome cannot depend on which trial reported first (the SQLite/server twins)."""
    import yaml

    from dedn.config import build_config
    from dedn.tuning import SweepSpec, load_search_space
    from dedn.tuning.space import default_space_path
    from dedn.tuning import run_sweep

    space = yaml.safe_load(Path(default_space_path()).read_text())
    space["asha"]["grace_period"] = 2
    path = storage / f"{name}-space.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space))
    base = build_config("awa2", TINY_TRAIN + [f"data.path={data}"])
    spec = SweepSpec(data=str(data), base=base, space=load_search_space(str(path)), num_samples=trials, max_concurrent_trials=trials,
                     cpus_per_trial=0.5, name=name, verbose=0, seed=3, storage=str(storage / "tune"))
    return run_sweep(spec)


@dataclass
class SqliteSweep:
    summary: object
    data: Path  # the copy swept (test shards poisoned)
    poisoned: dict[Path, bytes]
    home: Path  # DEDN_HOME; the store is sqlite:///<home>/mlflow.db


@pytest.fixture(scope="session")
def sqlite_sweep(awa2_tiny: Path, tmp_path_factory: pytest.TempPathFactory, ray_session) -> SqliteSweep:
    """The sweep on the embedded SQLite store, once per session, on the session's Ray."""
    import shutil

    tmp = tmp_path_factory.mktemp("sqlite-sweep")
    data = tmp / "data"
    shutil.copytree(awa2_tiny, data)
    poisoned = poison_test_shards(data)
    home = tmp / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("DEDN_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    try:
        _start_ray()  # a session fixture is made before the test's `_one_ray`
        summary = sweep_at_once(data, "sweep", home)
    finally:
        mp.undo()
    return SqliteSweep(summary, data, poisoned, home)
