"""Found early, said once (issue 27, item 5): a shard whose size or footer disagrees with dataset.json
stops a job before Ray starts or an MLflow run exists; same-size damage, which only the checksum on
read can see, ends the job with one `error:` line and no traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, home: Path, cwd: Path, address: str | None = None, *extra: str) -> tuple[int, str, float]:
    """jobs/train.py as a subprocess: an embedded Ray of its own, or the cluster at `address`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "DEDN_"))}
    env.update(DEDN_HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **({"RAY_ADDRESS": address} if address else {}))
    t0 = time.time()
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(data), "--preset", "cub",
                          "epochs=2", "optim.max_steps_per_epoch=2", "eval.batch_size=64", "--num-workers", "1",
                          "--no-register", *extra], capture_output=True, text=True, env=env, cwd=cwd, timeout=500)
    return out.returncode, out.stdout + out.stderr, time.time() - t0


def _copy(tiny_dataset, tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset.root, data)
    return data, sorted((data / "shards").glob("train-*.parquet"))[0]


@pytest.mark.parametrize("damage", ["truncated", "appended"])
def test_a_shard_of_the_wrong_size_stops_the_job_before_ray_and_mlflow(tiny_dataset, tmp_path: Path, damage: str) -> None:
    data, shard = _copy(tiny_dataset, tmp_path)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else raw + b"\0" * 100)
    home = tmp_path / "home"
    rc, out, seconds = _train(data, home, tmp_path)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, out[-3000:]
    assert f"{shard}: bytes: expected {len(raw)} (dataset.json)" in errors[0]
    assert "Traceback" not in out and "MLflow: run" not in out
    assert not (home / "mlflow.db").exists(), "an MLflow store was created before the data were checked"
    assert seconds < 30, f"found after {seconds:.0f} s"


@pytest.mark.slow
@pytest.mark.ray  # the job joins the session's Ray, as a job joins a cluster (its workers' output forwarded)
@pytest.mark.timeout(400)
def test_same_size_damage_is_found_on_read_and_said_once(tiny_dataset, tmp_path: Path) -> None:
    """The soak's corrupt_shard fault: 64 bytes flipped in the middle of a training shard, size and
    footer intact (the driver's footer checks pass). The worker's checksum finds it; the error is
    recorded, so Ray Train does not restart the worker group (the job allows 2 restarts), and the job
    says so once, naming the shard, as the DatasetError itself, not Ray's wrapper (before: two
    tracebacks, then the message after 31 s). Until 2026-12-06 tests/test_preflight.py ran the same
    fault in-process, a run more."""
    from ray.util.state import list_actors

    from conftest import ray_join_lines, session_ray_address
    from dedn.errors import DatasetError
    from dedn.training.fatal import FATAL_FILE, read_fatal

    def workers_started() -> int:  # Ray Train's worker actors on the session's Ray, finished ones included
        return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))

    data, shard = _copy(tiny_dataset, tmp_path)
    raw = bytearray(shard.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    shard.write_bytes(bytes(raw))
    home, before = tmp_path / "home", workers_started()
    rc, out, _ = _train(data, home, tmp_path, session_ray_address(), "--name", "corrupt")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, out[-3000:]
    assert len(ray_join_lines(out)) == 2, out[-3000:]  # joined: no Ray of its own
    assert f"{shard}: sha256: expected" in errors[0], errors[0]
    assert "Traceback" not in out, out[-4000:]
    recorded = read_fatal(home / "ray_results" / "corrupt" / FATAL_FILE)
    assert type(recorded) is DatasetError and Path(recorded.file).name == shard.name, recorded
    assert workers_started() - before == 1, "the worker group was restarted after a recorded error"
