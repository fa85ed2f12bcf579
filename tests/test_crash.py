"""A killed driver leaves no RUNNING orphan; the same --name continues the same MLflow run (issue 12, item 6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dedn.config import build_config


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


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_same_name_continues_the_same_run_with_a_whole_history(store: Path, tiny_dataset, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from dedn import tracking
    from dedn.training.debug import DebugHooks, InjectedFault
    from dedn.training.driver import RUN_RECORD_FILE, TrainSettings, train

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = build_config("cub", ["epochs=3", "optim.max_steps_per_epoch=2", "eval.batch_size=64",
                                   f"data.path={tiny_dataset.root}"])
        marker = tmp_path / "fault-once"
        hooks = DebugHooks(fail_rank=0, fail_epoch=2, fail_marker=str(marker))
        settings = TrainSettings(num_workers=1, max_failures=0, name="resumed", register=False, verbose=False,
                                 debug=hooks)
        with pytest.raises(Exception) as e:  # the run dies in selection epoch 2, after epoch 1's checkpoint
            train(cfg, settings)
        assert "injected fault" in str(e.value) or isinstance(e.value, InjectedFault)
        record = json.loads((store / "ray_results" / "resumed" / RUN_RECORD_FILE).read_text())
        c = tracking.client()
        assert c.get_run(record["run_id"]).info.status == "FAILED"

        out = train(cfg, settings)  # the same name: the marker exists, no fault this time
        assert out.run_id == record["run_id"]
        run = c.get_run(out.run_id)
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in c.get_metric_history(out.run_id, "val_H"))
        assert steps == [1, 2, 3]  # epoch 1 from the first attempt, 2 and 3 from the resumed one, none twice
        assert len(c.search_runs([run.info.experiment_id])) == 1
    finally:
        ray.shutdown()
