"""Shared fixtures: a seeded RNG for every test and a tiny semi-synthetic CUB-derived dataset."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

CUB_SOURCE = Path("/work/shared/data/CUB")  # real class-side files; the packaged asset otherwise


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


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


# ---- one sweep shared by test_tuning (its assertions) and test_team (the same sweep on the server) ----
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


def eight_trial_sweep(data: Path, name: str, storage: Path) -> object:
    """8 trials, 4 at a time, Optuna seed 3; ASHA's grace period = the epochs, so no trial is stopped
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
    spec = SweepSpec(data=str(data), base=base, space=load_search_space(str(path)), num_samples=8, max_concurrent_trials=4,
                     cpus_per_trial=0.5, name=name, verbose=0, seed=3, storage=str(storage / "tune"))
    return run_sweep(spec)


@dataclass
class SqliteSweep:
    summary: object
    data: Path  # the copy swept (test shards poisoned)
    poisoned: dict[Path, bytes]
    home: Path  # DEDN_HOME; the store is sqlite:///<home>/mlflow.db


@pytest.fixture(scope="session")
def sqlite_sweep(awa2_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> SqliteSweep:
    """The 8-trial sweep on the embedded SQLite store, once per session."""
    tmp = tmp_path_factory.mktemp("sqlite-sweep")
    home = tmp / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("DEDN_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    try:
        summary, data, poisoned = sweep_a_poisoned_copy(awa2_tiny, tmp, "sweep", home)
    finally:
        mp.undo()
    return SqliteSweep(summary, data, poisoned, home)


def sweep_a_poisoned_copy(source: Path, tmp: Path, name: str, storage: Path) -> tuple[object, Path, dict[Path, bytes]]:
    """`eight_trial_sweep` on a copy of `source` whose test shards are garbage (a sweep never reads them),
    in its own embedded 2-CPU Ray with the dashboard (as tuning/tune.py starts it); the tracking store is
    whatever the environment names. Returns (summary, the copy, the poisoned shards)."""
    import shutil

    import ray

    data = tmp / "data"
    shutil.copytree(source, data)
    poisoned = poison_test_shards(data)
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # tiny epochs: noise
    mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as tuning/tune.py sets it: faster worker start-up
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        return eight_trial_sweep(data, name, storage), data, poisoned
    finally:
        ray.shutdown()
        mp.undo()


# ---- registrations from several processes at once (test_concurrency on SQLite, test_team on the server) ----
def _register(env: dict[str, str | None], start: object, name: str, hs: list[float]) -> None:
    import os

    for k, v in env.items():  # None: unset (the default store)
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    from dedn import tracking
    from dedn.tracking.registry import promote_best

    start.wait()  # type: ignore[attr-defined]  # every process creates the store and registers at the same moment
    tracking.init_store()
    c = tracking.client()
    try:
        c.create_registered_model(name)
    except Exception:  # noqa: BLE001 - another process created it first
        pass
    # a server accepts only sources inside a given run's artifacts; the local store takes any source (and
    # the test of its concurrent first use stays about registrations alone). The versions only need tags.
    run = c.create_run(tracking.get_or_create_experiment(name)) if tracking.tracking_uri().startswith("http") else None
    for h in hs:
        mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/model-{h}" if run else f"file:///nowhere/{h}",
                                    run_id=run.info.run_id if run else None)
        c.set_model_version_tag(name, mv.version, "val_H", repr(h))
        promote_best(name)


def register_at_once(env: dict[str, str | None], name: str, hs: list[float], processes: int = 4) -> list[int | None]:
    """`processes` spawned processes register `hs` (an equal share each) as versions of `name`, each
    promoting the champion after every version; their exit codes."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start = ctx.Barrier(processes)
    share = len(hs) // processes
    procs = [ctx.Process(target=_register, args=(env, start, name, hs[share * i:share * (i + 1)])) for i in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(200)
    return [p.exitcode for p in procs]
