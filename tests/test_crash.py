"""A killed driver leaves no RUNNING orphan and no Ray behind; the same --name continues the same MLflow
run (issue 12, items 6 and 7). A full disk during a checkpoint: tests/test_distributed.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dedn.config import build_config
from dedn.procs import descendants, running
from dedn.training.ray_cluster import AGENT_TITLES as AGENTS
from dedn.training.driver import SNAPSHOT_COPY, SNAPSHOT_FILE
from dedn.training.ray_cluster import PRIVATE_PREFIX


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def test_runs_of_a_dead_driver_are_marked_killed_on_the_next_start(store: Path, tiny_dataset) -> None:
    from dedn import tracking
    from dedn.tracking.runs import _driver_id

    tracking.init_store()
    cfg = build_config("cub", [f"data.path={tiny_dataset.root}"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tracking.start_training_run(cfg, name="orphan", semi_synthetic=True)
    # the same host, a pid that has exited: the driver of this run is gone
    tracking.set_tags(orphan.run_id, {tracking.DRIVER_TAG: _driver_id().replace(f":{os.getpid()}:", f":{int(dead.stdout)}:")})
    live = tracking.start_training_run(cfg, name="live", semi_synthetic=True)  # this process: alive
    other = tracking.start_training_run(cfg, name="other-host", semi_synthetic=True)
    tracking.set_tags(other.run_id, {tracking.DRIVER_TAG: "elsewhere:1:1"})  # cannot be judged from here
    nxt = tracking.start_training_run(cfg, name="next", semi_synthetic=True)
    c = tracking.client()
    assert c.get_run(orphan.run_id).info.status == "KILLED"
    assert [c.get_run(r.run_id).info.status for r in (live, other, nxt)] == ["RUNNING"] * 3



def test_ray_trains_record_cut_short_by_a_kill_is_restored_from_its_whole_copy(tmp_path: Path) -> None:
    """Ray Train rewrites its record of a run's checkpoints in place; a controller callback keeps a whole
    copy after each round with a checkpoint, and a continued run puts it back when the record is cut short."""
    from dedn.errors import ConfigError
    from dedn.training.driver import _keep_snapshot, restore_snapshot

    folder = tmp_path / "run"
    folder.mkdir()
    record, copy = folder / SNAPSHOT_FILE, folder / SNAPSHOT_COPY
    assert restore_snapshot(str(folder)) is None  # a new run: nothing to do
    keep = _keep_snapshot(str(folder))
    record.write_text('{"checkpoints": [1]}')
    keep.after_report(None, [{}], None)
    assert not copy.exists()  # a round without a checkpoint: Ray rewrote nothing
    keep.after_report(None, [{}], object())
    assert copy.read_text() == '{"checkpoints": [1]}'
    record.write_text('{"checkpoints": [1, 2')  # being rewritten: no copy of that
    keep.after_report(None, [{}], object())
    assert copy.read_text() == '{"checkpoints": [1]}'
    record.write_text('{"checkpoints": [1, 2]}')
    assert restore_snapshot(str(folder)) is None and record.read_text() == '{"checkpoints": [1, 2]}'  # whole: kept
    record.write_text("")
    assert "was cut short" in restore_snapshot(str(folder)) and record.read_text() == '{"checkpoints": [1]}'
    record.write_text("")
    copy.unlink()
    with pytest.raises(ConfigError, match=f"{SNAPSHOT_FILE}.*cut short.*another --name"):
        restore_snapshot(str(folder))


@pytest.mark.ray
def test_ctrl_c_while_registering_marks_the_run_killed_and_ctrl_c_is_ours_again(store: Path, tiny_dataset,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's fit() leaves its own Ctrl-C handler installed (it aborts the run, which has ended): the
    driver puts the caller's back, so a Ctrl-C while the final model registers interrupts it, and the
    MLflow run ends KILLED, not RUNNING. The training itself is a stand-in here (no Ray Train run)."""
    from types import SimpleNamespace

    from dedn import tracking
    from dedn.training import driver

    def fit() -> SimpleNamespace:
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # as Ray Train's fit() leaves it
        return SimpleNamespace(error=None, checkpoint=None)

    def register(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the model is logged

    got = {"val": {"H": 0.5}, "test": {"H": 0.4}, "best_epoch": 1, "weights": {}, "state": {}}
    monkeypatch.setattr(driver, "build_trainer", lambda *a, **k: SimpleNamespace(fit=fit))
    monkeypatch.setattr(driver, "_outcome_of", lambda *a: (None, got))
    monkeypatch.setattr(driver, "_register", register)
    ours = signal.getsignal(signal.SIGINT)
    cfg = build_config("cub", [f"data.path={tiny_dataset.root}"])
    with pytest.raises(KeyboardInterrupt):
        driver.train(cfg, driver.TrainSettings(num_workers=1, name="ctrl-c", verbose=False))
    assert signal.getsignal(signal.SIGINT) is ours
    run_id = json.loads((store / "ray_results" / "ctrl-c" / "mlflow_run.json").read_text())["run_id"]
    assert tracking.client().get_run(run_id).info.status == "KILLED"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.own_cluster  # counts what is left of its driver's Ray processes
@pytest.mark.timeout(400)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the driver's processes")
def test_a_killed_or_terminated_driver_takes_its_ray_along_and_the_run_continues(store: Path, tiny_dataset,
                                                                                tmp_path: Path) -> None:
    """jobs/train.py killed (SIGKILL), then continued with the same --name and stopped by SIGTERM (a
    scheduler): no Ray process outlives either driver for long, the one MLflow run holds both jobs'
    epochs once each and ends KILLED rather than RUNNING (issue 12, items 6 and 7). Continuing to the
    end with the same result: tests/test_distributed.py (the full-disk test)."""
    from dedn import tracking

    epochs = 30  # never reached: both jobs are stopped long before
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "train.py"), "--data", str(tiny_dataset.root),
           "--preset", "cub", f"epochs={epochs}", "optim.max_steps_per_epoch=2", "eval.batch_size=64",
           "--num-workers", "1", "--name", "stopped", "--no-register"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray of its own
    run_dir = store / "ray_results" / "stopped"
    drivers: list[int] = []

    def start_and_stop_after(sig: int, linger: tuple[str, ...] = ()) -> tuple[int, str, dict[int, str]]:
        """Start the job, stop it with `sig` once it has written a checkpoint of its own; what is left
        of its Ray after up to 15 s (or once only `linger` processes are)."""
        done = [int(d.name[-4:]) for d in run_dir.glob("select-epoch*")] if run_dir.is_dir() else []
        epoch = max(done, default=0) + 1
        assert epoch <= epochs, "the first stop came too late to leave an epoch for the second"
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        drivers.append(proc.pid)
        end = time.time() + 240
        while not (run_dir / f"select-epoch{epoch:04d}").is_dir() or not (run_dir / SNAPSHOT_COPY).is_file():
            if proc.poll() is not None or time.time() > end:
                proc.kill()
                pytest.fail(f"the run ended or stalled before epoch {epoch}: {proc.communicate()[1][-3000:]}")
            time.sleep(0.05)
        below = descendants(proc.pid)
        assert any("raylet" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                   for p in running(below)), "no embedded Ray below the driver"
        titles = {p: Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                  for p in running(below)}
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        end = time.time() + 15
        while time.time() < end and not set(titles.get(p, "?") for p in running(below)) <= set(linger):
            time.sleep(0.25)
        return proc.returncode, err, {p: titles.get(p, "?") for p in running(below)}

    # killed after its first epoch: nothing runs in the driver then. GCS, raylet and workers die with
    # it; Ray's two agents wait out a 60 s call to the dead GCS, and the next start reaps them
    rc, _, lingering = start_and_stop_after(signal.SIGKILL, linger=AGENTS)
    assert rc == -signal.SIGKILL
    assert set(lingering.values()) <= set(AGENTS), f"outlived the killed driver: {lingering}"
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    c = tracking.client()
    assert c.get_run(run_id).info.status == "RUNNING"  # nobody could say otherwise yet
    # as when the kill lands while Ray Train rewrites its record of the checkpoints (in place): empty
    (run_dir / SNAPSHOT_FILE).write_text("")

    # the same --name continues that run; a SIGTERM (a scheduler) after its first epoch ends the job
    # cleanly: ray.shutdown runs, nothing of either Ray is left, the run is KILLED, not RUNNING
    rc, err, left = start_and_stop_after(signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "SIGTERM: stopping; the MLflow run is marked KILLED" in err, err[-2000:]
    assert f"note: {run_dir / SNAPSHOT_FILE} was cut short" in err, err[-2000:]  # restored from its whole copy
    assert left == {}, f"Ray processes outlived the driver: {left}"
    assert running(list(lingering)) == [], f"the next start did not reap the killed driver's agents: {lingering}"
    private = Path(tempfile.gettempdir()) / f"{PRIVATE_PREFIX}{drivers[0]}"  # the killed driver's Ray's folder
    assert not private.exists(), f"the next start left the killed driver's {private}"
    assert c.get_run(run_id).info.status == "KILLED"
    assert len(c.search_runs([c.get_run(run_id).info.experiment_id])) == 1  # one run, continued
    steps = sorted(m.step for m in c.get_metric_history(run_id, "val/H"))
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2  # both jobs' epochs, none twice
