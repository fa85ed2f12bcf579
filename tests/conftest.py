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
