"""Multi-seed reproduction (dedn/tuning/seeds.py, jobs/reproduce.py): the arithmetic, and 2 seeds as Tune trials
(two make a spread: what a third adds is another trial, not another check)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from dedn.errors import ConfigError

TINY = ["optim.epochs=2", "optim.max_steps_per_epoch=2", "optim.batch_size=16", "eval.batch_size=512"]


def test_spread_is_mean_sample_std_min_max():
    from dedn.tuning.seeds import spread

    v = [0.61, 0.58, 0.66, 0.60]
    got = spread(v)
    assert got["mean"] == pytest.approx(np.mean(v)) and got["std"] == pytest.approx(np.std(v, ddof=1))
    assert (got["min"], got["max"]) == (0.58, 0.66)
    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5}


def test_seeds_and_their_errors(tiny_dataset):
    from dedn.config import build_config
    from dedn.tuning.seeds import SeedsSpec, seed_list

    assert seed_list(214, 3) == [214, 215, 216]
    with pytest.raises(ConfigError, match="--num-seeds"):
        seed_list(214, 0)
    base = build_config("cub", [f"data.path={tiny_dataset.root}"])
    for seeds, key in (([], "--seeds"), ([3, 3], "--seeds"), ([-1], "--seeds")):
        with pytest.raises(ConfigError, match=key):
            SeedsSpec(data=str(tiny_dataset.root), base=base, seeds=seeds)
    with pytest.raises(ConfigError, match="--gpus-per-trial"):
        SeedsSpec(data=str(tiny_dataset.root), base=base, seeds=[1], gpus_per_trial=2)


def test_the_table_shows_each_seed_the_spread_and_the_paper_row():
    from dedn.tuning.seeds import SeedsSummary, format_seeds, spread

    rows = [{"seed": s, "run_id": f"r{s}", "best_epoch": 3, **{f"test_{k}": h for k in "TUSH"}, "val_H": h}
            for s, h in ((1, 0.5), (2, 0.7))]
    stats = {f"{p}_{k}": spread([r[f"test_{k}"] if p == "test" else r["val_H"] for r in rows])
             for p in ("test", "val") for k in "TUSH"}
    text = format_seeds(SeedsSummary("s", "p", "dedn-cub", "dedn", "CUB", True, rows, stats),
                        {"T": 77.4, "U": 70.9, "S": 70.0, "H": 70.4})
    assert "SEMI-SYNTHETIC" in text
    assert f"| 60.0 ± {100 * math.sqrt(0.02):.1f} |" in text  # mean 0.6, std sqrt(((0.1)^2 * 2) / 1)
    assert "| min – max | | 50.0 – 70.0 |" in text and "| paper (one seed) | | 77.4 | 70.9 | 70.0 | 70.4 | |" in text


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_seeds_in_parallel_under_one_parent_with_their_spread(tiny_dataset, tmp_path, monkeypatch):
    from dedn import tracking
    from dedn.config import build_config
    from dedn.tracking.results import collect, format_table1
    from dedn.training.driver import TrainSettings, train
    from dedn.tuning.seeds import SeedsSpec, run_seeds, spread

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = build_config("cub", TINY + [f"data.path={tiny_dataset.root}", "optim.seed=7"])
    summary = run_seeds(SeedsSpec(data=str(tiny_dataset.root), base=base, seeds=[7, 8], cpus_per_trial=0.6,
                                  name="two", verbose=0))
    assert [r["seed"] for r in summary.rows] == [7, 8] and summary.semi_synthetic
    for key in ("test_H", "test_U", "val_H"):
        assert summary.stats[key] == pytest.approx(spread([r[key] for r in summary.rows]))

    c = tracking.client()
    parent = c.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[tracking.KIND_TAG] == "seeds"
    assert parent.data.metrics["seeds/test_H_mean"] == pytest.approx(summary.stats["test_H"]["mean"])
    assert {a.path for a in c.list_artifacts(summary.parent_run_id)} >= {"seeds.json", "seeds.md"}
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    assert sorted(int(r.data.tags["seed"]) for r in children) == [7, 8]
    by_seed = {int(r.data.tags["seed"]): r for r in children}
    for row in summary.rows:
        child = by_seed[row["seed"]]
        assert child.info.status == "FINISHED" and child.info.run_id == row["run_id"]
        assert child.data.metrics["test/H"] == pytest.approx(row["test_H"], abs=1e-12)
    losses = {round(r.data.metrics["train/loss"], 6) for r in children}
    assert len(losses) == 2, "the seeds trained alike: the seed did not reach the runs"

    # one seed's result is that seed's plain training run (the same config, one worker)
    alone = train(base.replace(**{"optim.seed": 8}), TrainSettings(num_workers=1, cpus_per_worker=0.59, track=False,
                                                                    register=False, verbose=False, name="alone-8"))
    row8 = next(r for r in summary.rows if r["seed"] == 8)
    assert {k: row8[f"test_{k}"] for k in "TUSH"} == pytest.approx(alone.test_metrics, abs=1e-12)

    # the results table, from the parent run
    entries = collect(["CUB"], "seeds")
    assert entries["CUB"].metrics["H"] == pytest.approx(summary.stats["test_H"]["mean"])
    assert " ± " in format_table1(entries) and "2 seeds" in format_table1(entries)
    assert os.environ["DEDN_HOME"] == str(tmp_path / "home") and Path(tmp_path / "home" / "mlflow.db").exists()
