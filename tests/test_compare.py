"""dedn.analysis.compare and jobs/compare.py: every family trained by the one driver (Ray Train) with the same seed and budget, one table."""
from __future__ import annotations

import csv
import io

import pytest
from toydata import load_job

from dedn.analysis.compare import ComparisonRow, compare_models, model_config, to_csv, to_markdown, write_table
from dedn.errors import ConfigError



pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory):
    """An embedded 2-CPU Ray and a private DEDN_HOME (Ray Train storage) for this module."""
    import os

    import ray

    home = tmp_path_factory.mktemp("compare_home")
    saved = os.environ.get("DEDN_HOME")
    os.environ["DEDN_HOME"] = str(home)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield home
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("DEDN_HOME", None)
        else:
            os.environ["DEDN_HOME"] = saved


@pytest.fixture(scope="module")
def rows(ray_home, tiny_dataset) -> list[ComparisonRow]:
    return compare_models(tiny_dataset, models=["dedn", "msdn"], epochs=1, seed=3, max_steps_per_epoch=2, protocol="final")


def test_same_seed_and_budget_for_both_models(rows, tiny_dataset) -> None:
    assert [r.model for r in rows] == ["dedn", "msdn"]
    for r in rows:
        assert (r.seed, r.epochs, r.steps, r.protocol, r.dataset) == (3, 1, 2, "final", "CUB")
        assert r.images > 0 and r.images_per_s > 0 and r.train_seconds > 0
        assert all(0.0 <= getattr(r, k) <= 1.0 for k in "TUSH")
    c = tiny_dataset.feature_shape[0]
    d, g = tiny_dataset.class_side.word_vectors.shape
    assert rows[1].parameters == d * g + 4 * g * c  # V + W1, W2, W1_1, W2_1


def test_rerun_is_deterministic(rows, tiny_dataset) -> None:
    again = compare_models(tiny_dataset, models=["msdn"], epochs=1, seed=3, max_steps_per_epoch=2, protocol="final")
    assert [again[0].T, again[0].U, again[0].S, again[0].H] == [rows[1].T, rows[1].U, rows[1].S, rows[1].H]


def test_tables(rows, tmp_path) -> None:
    md = to_markdown(rows, title="tiny")
    lines = md.strip().splitlines()
    assert lines[:2] == ["tiny", ""] and lines[2].startswith("| model | T | U | S | H | images/s | parameters")
    assert lines[4].startswith("| dedn |") and lines[5].startswith("| msdn |")
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [p["model"] for p in parsed] == ["dedn", "msdn"]
    assert float(parsed[1]["H"]) == rows[1].H and int(parsed[1]["parameters"]) == rows[1].parameters
    md_path, csv_path = write_table(rows, tmp_path / "out")
    assert md_path.read_text() == to_markdown(rows) and csv_path.read_text() == to_csv(rows)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_unknown_model_or_preset() -> None:
    with pytest.raises(ConfigError, match="model"):
        model_config("gpt", "cub")
    with pytest.raises(ConfigError, match="preset"):
        model_config("msdn", "CUB", preset="imagenet")


def test_job_writes_the_table(ray_home, tiny_dataset, tmp_path) -> None:
    job = load_job("compare")
    out = tmp_path / "job"
    rc = job.main(["--data", str(tiny_dataset.root), "--models", "msdn", "--max-steps", "1", "--out", str(out),
                   "--no-track"])
    assert rc == 0
    text = (out / "compare.md").read_text()
    assert "SEMI-SYNTHETIC CUB (16x2x2)" in text and "| msdn |" in text
    assert job.main(["--data", str(tmp_path / "missing"), "--no-track", "--out", str(out)]) == 2
