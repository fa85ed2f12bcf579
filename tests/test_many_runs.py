"""Many runs on one machine (issue 27, item 1): each local run has a private Ray that no other run
joins; a cluster is joined only when asked for, and a joined cluster that goes away ends the run
with one line naming the `--name` that continues it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dedn.training.ray_cluster import cluster_address

ROOT = Path(__file__).resolve().parents[1]
JOINED = ("Connecting to existing Ray cluster", "Found multiple active Ray instances", "PlacementGroupCleaner")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "DEDN_"))}
    env.update(DEDN_HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _train_cmd(data: Path, name: str, epochs: int) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(data), "--preset", "cub",
            f"epochs={epochs}", "optim.max_steps_per_epoch=2", "eval.batch_size=64", "--num-workers", "1",
            "--name", name, "--no-register"]


def _wait_for(proc: subprocess.Popen, log: Path, text: str, seconds: float) -> None:
    end = time.time() + seconds
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            pytest.fail(f"{text!r} never came (rc {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def test_only_an_asked_for_cluster_is_joined(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--address / RAY_ADDRESS win; a `ray start` address file counts only while its GCS answers;
    nothing else (another run's embedded Ray) is joined."""
    import socket

    import ray._private.utils as ray_utils

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)  # the tests' own Ray sets it (conftest)
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: None)
    assert cluster_address() is None  # nothing asked for: a private Ray
    assert cluster_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert cluster_address() == "http://127.0.0.1:8265"
    assert cluster_address("127.0.0.1:1") == "127.0.0.1:1"  # the option beats the variable
    monkeypatch.delenv("RAY_ADDRESS")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: f"127.0.0.1:{port}")
        assert cluster_address() == f"127.0.0.1:{port}"  # `ray start` made it and it answers
        # the same answering address in the folder a parent driver's embedded Ray left in RAY_TMPDIR
        # (a job started by a job, or by the test session): that Ray is private, not joined
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "dedn-ray-12345"))
        assert cluster_address() is None
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "my-ray-tmp"))  # a user's own choice of folder
        assert cluster_address() == f"127.0.0.1:{port}"
    # the same file once its head was killed without `ray stop`: stale, not joined
    assert cluster_address() is None


def test_a_dead_drivers_temp_folder_goes_and_nothing_else(tmp_path: Path) -> None:
    """The next embedded start removes `dedn-ray-<pid>` folders whose driver is gone (a SIGKILL runs no
    atexit), but not a live process's, nor one whose Ray still answers (a driver in another pid
    namespace sharing /tmp), nor anything not named so."""
    import socket

    from dedn.training.ray_cluster import PRIVATE_PREFIX, remove_dead_private_folders

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)

    def folder(name: str, address: str | None = None) -> Path:
        (tmp_path / name / "ray").mkdir(parents=True)
        if address:
            (tmp_path / name / "ray" / "ray_current_cluster").write_text(address + "\n")
        return tmp_path / name

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        gone = folder(f"{PRIVATE_PREFIX}{dead_pid}", "127.0.0.1:1")  # its GCS port answers nothing
        alive = folder(f"{PRIVATE_PREFIX}{os.getppid()}")
        elsewhere = folder(f"{PRIVATE_PREFIX}{dead_pid + 1000000}", f"127.0.0.1:{port}")  # no such pid here
        other = folder("dedn-rayx-1")
        assert remove_dead_private_folders(tmp_path) == [gone]
    assert not gone.exists() and alive.is_dir() and elsewhere.is_dir() and other.is_dir()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.own_cluster  # private Rays that must not meet another
@pytest.mark.timeout(900)
def test_three_local_runs_and_a_sweep_at_once_each_finish(tiny_dataset, tmp_path: Path) -> None:
    """Two training runs and a sweep started together on one machine and one store: each has its own
    Ray, each finishes, and every epoch of every run is in the store once (before: the second run
    joined the first one's embedded Ray and died with it). The sweep has one trial (two, one after
    the other, until 2026-12-06: what a sweep does with several is test_tuning's and test_team's)."""
    home = tmp_path / "home"
    env = _env(home)
    data = tiny_dataset.root
    cmds = {
        "a": _train_cmd(data, "run-a", 4),
        "b": _train_cmd(data, "run-b", 3),
        "sweep": [sys.executable, str(ROOT / "tuning" / "tune.py"), "--data", str(data), "--preset", "cub",
                  "--num-samples", "1", "--cpus-per-trial", "0.5", "--name", "sweep-c",
                  "optim.epochs=2", "optim.max_steps_per_epoch=2", "eval.batch_size=64"],
    }
    procs, logs = {}, {}
    for key, cmd in cmds.items():
        logs[key] = tmp_path / f"{key}.log"
        procs[key] = subprocess.Popen(cmd, stdout=logs[key].open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        if key == "a":  # A's Ray is up and its run is created before the others start
            _wait_for(procs["a"], logs["a"], "MLflow: run", 240)
    end = time.time() + 800
    for p in procs.values():
        try:
            p.wait(max(1.0, end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    out = {k: logs[k].read_text(errors="replace") for k in procs}
    for key, p in procs.items():
        assert p.returncode == 0, f"{key} exited {p.returncode}:\n{out[key][-4000:]}"
        for line in (*JOINED, "Traceback"):
            assert line not in out[key], f"{key}: {line!r} in its output:\n{out[key][-3000:]}"

    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in c.search_runs([e.experiment_id for e in c.search_experiments()])}
    for name, epochs in (("run-a", 4), ("run-b", 3)):
        run = runs[name]
        assert run.info.status == "FINISHED", name
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "val/H")]
        assert steps == list(range(1, epochs + 1)), f"{name}: val/H logged at steps {steps}"
    trials = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") and r.info.run_name not in ("run-a", "run-b")]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED", [(r.info.run_name, r.info.status) for r in trials]


def _ray_processes_with(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.own_cluster  # private Rays that must not meet another
@pytest.mark.timeout(400)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the cluster's processes in /proc")
def test_a_joined_cluster_that_goes_away_ends_the_run_with_one_line(tiny_dataset, tmp_path: Path) -> None:
    """A run joins a `ray start` cluster (asked for by --address); the cluster's head is killed mid-run: the run
    ends within seconds with one `error:` line naming the cluster and the --name that continues it
    (before: a 60 s hang, then Ray's own C++ line and exit 1)."""
    from conftest import free_port

    home, temp = tmp_path / "home", Path("/tmp") / f"dedn-rx-{os.getpid()}"  # Ray's socket paths must stay short
    env = _env(home)
    env.update(HOME=str(tmp_path / "user"), RAY_AUTH_MODE="token")
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    # its own RAY_TMPDIR keeps its address file away from /tmp/ray (no other test's Ray sees this
    # cluster), and its processes, which inherit it, find their cluster's address there
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], env={**env, "RAY_TMPDIR": str(temp)}, check=True, capture_output=True)
    log = tmp_path / "job.log"
    try:
        proc = subprocess.Popen(_train_cmd(tiny_dataset.root, "joined", 40) + ["--address", f"127.0.0.1:{port}"],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        _wait_for(proc, log, "epoch   2", 240)
        assert "Connecting to existing Ray cluster" in log.read_text()
        killed = time.time()
        for pid in _ray_processes_with(str(temp)):  # the whole cluster at once, as a lost head node
            os.kill(pid, signal.SIGKILL)
        proc.wait(50)
        took = time.time() - killed
    finally:
        for pid in _ray_processes_with(str(temp)):
            os.kill(pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, out[-3000:]
    assert took < 30, f"the run took {took:.0f} s to end after its cluster went away"
    assert errors == [errors[0]] and f":{port} went away" in errors[0] and "--name joined" in errors[0], out[-3000:]
    assert out.rstrip().splitlines()[-1] == errors[0]
    assert "Traceback" not in out
