"""A third model family defined in the test suite (tests/toy_family.py) runs through every job unchanged.

jobs/train.py with 2 workers (and the registry round trip), a sweep with tuning/tune.py (one trial of 2 workers),
and the comparison job: each a subprocess that finds the family through DEDN_FAMILY_MODULES,
as a user's own family would be found. No file outside tests/ names it. The jobs join the
session's Ray (`RAY_ADDRESS`) as a user's jobs join a running cluster: its workers learn the
family module from the driver (dedn.training.ray_cluster.PLUGIN_ENV), and find it on their path.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from toydata import write_toy_dataset

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # three jobs on the session's Ray

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, ray_session) -> dict[str, str]:
    from conftest import session_ray_address

    home = tmp_path_factory.mktemp("toy_home")
    out = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    # the family module is not in the session Ray's environment: only the driver's forwarding brings it
    out.update(DEDN_HOME=str(home), DEDN_FAMILY_MODULES="toy_family", RAY_USAGE_STATS_ENABLED="0",
               RAY_ADDRESS=session_ray_address(),
               PYTHONPATH=os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy_data") / "toy", per_class=4)


def _run(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def trained(env: dict[str, str], data: Path) -> str:
    return _run(env, "jobs/train.py", "--data", str(data), "--num-workers", "2", "model=toy", "epochs=3",
                "optim.lr=0.05", "optim.batch_size=8", "eval.batch_size=64")


@pytest.mark.timeout(360)
def test_train_job_with_two_workers_and_registry_round_trip(trained: str, env: dict[str, str], data: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import toy_family

    from dedn import tracking
    from dedn.checkpoint import load_checkpoint
    from dedn.config import RunConfig
    from dedn.data import FeatureDataset
    from dedn.data.reader import ShardReader
    from dedn.tracking.registry import load_predictor
    from dedn.training.loop import model_from_state

    assert "Training TOY on SEMI-SYNTHETIC TOY" in trained and "on 2 worker(s)" in trained
    assert "ce_mean" in trained and "alpha" in trained  # its own loss parts and weight in the progress lines
    assert "registered model toy-toy version 1" in trained
    monkeypatch.setenv("DEDN_HOME", env["DEDN_HOME"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = tracking.client()
    (run,) = c.search_runs([c.get_experiment_by_name("dedn-toy").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "toy"
    # a new family's loss parts and weight land in the same UI sections as DEDN's
    assert {"train/ce_mean", "train/ce_max", "train/ridge", "val/alpha", "val/H", "final/ce_mean", "test/H"} <= set(run.data.metrics)
    assert "val/lambda_rc" not in run.data.metrics and run.data.params["eval.alpha"] == "0.5"
    # the registered model scores like the network rebuilt from the run's final checkpoint
    pred = load_predictor("models:/toy-toy@champion")
    assert isinstance(pred.model, toy_family.ToyNet)
    ds = FeatureDataset.open(data)
    state = load_checkpoint(Path(run.data.tags[tracking.CHECKPOINT_TAG]) / "state.pt")
    assert set(state["optimizers"]) == {"mean", "max"}  # the family's own two optimisers were checkpointed
    cfg = RunConfig.from_dict(state["config"])
    assert cfg.eval.alpha == pred.cfg.eval.alpha and not cfg.eval.fit_weights  # the selected weight
    net = model_from_state(cfg, ds, state["model"]).eval()
    x = next(iter(ShardReader(ds, "test_unseen", batch_size=5, shuffle=False))).features
    with torch.no_grad():
        want = toy_family.FAMILY.combine(cfg, toy_family.FAMILY.score_parts(net(x))).numpy()
    np.testing.assert_allclose(pred.scores(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(420)
def test_sweep_uses_the_family_space_and_weight_on_a_two_worker_trial(trained: str, env: dict[str, str], data: Path,
                                                                      tmp_path: Path) -> None:
    """One trial of `--workers-per-trial 2 --cpus-per-trial 2` on the 2-CPU session Ray: a TorchTrainer per
    trial whose two workers share the trial's budget with the trial function, the family's own search
    space and weight, and no read of the test shards (poisoned in a copy of the data). Until 2026-12-07
    two trials here, and the 2-worker trial in tests/test_tuning.py on DEDN: trials at once are the
    SQLite/server sweep twins' subject (conftest.sweep_at_once)."""
    import shutil

    from conftest import poison_test_shards

    swept = tmp_path / "toy"
    shutil.copytree(data, swept)
    poisoned = poison_test_shards(swept)
    out = _run(env, "tuning/tune.py", "--data", str(swept), "--num-samples", "1", "--max-concurrent-trials", "1",
               "--workers-per-trial", "2", "--cpus-per-trial", "2", "--name", "toysweep", "model=toy", "epochs=2",
               "optim.batch_size=8", "eval.batch_size=64", "eval.weight_grid_step=0.25", timeout=400)
    assert "best trial" in out and "alpha = " in out
    sweep = Path(env["DEDN_HOME"]) / "tune" / "toysweep"
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["num_trials"] == 1 and set(summary["weights"]) == {"alpha"}
    assert 0.0 <= summary["best_val_H"] <= 1.0
    assert set(summary["best_params"]) == {"loss.ridge", "optim.lr"}  # tests/toy_space.yaml
    best = yaml.safe_load((sweep / "best_config.yaml").read_text())
    assert best["model"]["name"] == "toy" and best["protocol"] == "final"
    assert best["eval"]["alpha"] == summary["weights"]["alpha"] and best["eval"]["fit_weights"] is False
    assert (sweep / "lambda_curves.png").stat().st_size > 5000  # Figure 3 over the family's one weight
    for p, junk in poisoned.items():
        assert p.stat().st_atime == 1_000, f"{p} was read during the sweep"
        assert p.read_bytes() == junk


@pytest.mark.timeout(420)
def test_comparison_job_runs_the_family_next_to_dedn(trained: str, env: dict[str, str], data: Path,
                                                    tmp_path: Path) -> None:
    out = _run(env, "jobs/compare.py", "--data", str(data), "--models", "dedn", "toy", "--max-steps", "2",
               "--seed", "3", "--out", str(tmp_path / "cmp"), "eval.batch_size=64", "optim.batch_size=8", timeout=400)
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| dedn |" in table and "| toy |" in table
    # the same seed and budget for both (DEDN's row in the comparison: tests/test_compare.py has the others)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "compare.csv").read_text())))
    assert [r["model"] for r in rows] == ["dedn", "toy"]
    for r in rows:
        assert (r["seed"], r["epochs"], r["steps"], r["protocol"], r["dataset"], r["batch_size"]) == \
            ("3", "1", "2", "final", "TOY", "8"), r
        assert int(r["images"]) > 0 and float(r["images_per_s"]) > 0 and float(r["train_seconds"]) > 0
        assert all(0.0 <= float(r[k]) <= 1.0 for k in "TUSH") and int(r["parameters"]) > 0
    assert re.search(r"SEMI-SYNTHETIC TOY \(\d+x\d+x\d+\)", table), table  # the data's kind and feature shape
    assert "one child run per model" in out
