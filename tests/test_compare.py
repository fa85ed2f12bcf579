"""dedn.analysis.compare and jobs/compare.py: every family trained by the one driver (Ray Train) with the same seed and budget, one table.

MSDN and D3GZSL here, in this process; DEDN's row (beside a fourth family's) comes from the comparison
job in tests/test_toy_family.py, through the same `compare_models`, and is checked there the same way
(until 2026-12-07 DEDN was trained here too: one run more for the same check). A rerun's equality is
checked in process for MSDN (tests/test_msdn.py) and on Ray Train for DEDN and D3GZSL (tests/test_seeds.py,
tests/test_distributed.py); until 2026-12-07 MSDN was rerun here, one Ray Train run more."""
from __future__ import annotations

import csv
import io

import pytest
from toydata import load_job

from dedn.analysis.compare import ComparisonRow, compare_models, model_config, to_csv, to_markdown, write_table
from dedn.errors import ConfigError





@pytest.fixture(scope="module")
def ray_home(tmp_path_factory, ray_session):
    """A private DEDN_HOME (Ray Train storage) for this module, on the session's Ray."""
    import os

    home = tmp_path_factory.mktemp("compare_home")
    saved = os.environ.get("DEDN_HOME")
    os.environ["DEDN_HOME"] = str(home)
    try:
        yield home
    finally:
        if saved is None:
            os.environ.pop("DEDN_HOME", None)
        else:
            os.environ["DEDN_HOME"] = saved


@pytest.fixture(scope="module")
def rows(ray_home, tiny_dataset) -> list[ComparisonRow]:
    # two families (DEDN: the module docstring); D3GZSL's widths and per-evaluation work cut to the tiny set
    d3 = ["d3gzsl:model.hidden=64", "d3gzsl:model.embed_dim=32", "d3gzsl:eval.syn_per_class=10",
          "d3gzsl:loss.teacher_epochs=2", "d3gzsl:eval.classifier_epochs=2"]
    return compare_models(tiny_dataset, models=["msdn", "d3gzsl"], epochs=1, seed=3, max_steps_per_epoch=2,
                          protocol="final", overrides=d3)


@pytest.mark.ray
@pytest.mark.slow  # the two families trained (`rows`)
def test_same_seed_and_budget_for_every_model(rows, tiny_dataset) -> None:
    assert [r.model for r in rows] == ["msdn", "d3gzsl"]
    for r in rows:
        assert (r.seed, r.epochs, r.steps, r.protocol, r.dataset) == (3, 1, 2, "final", "CUB")
        assert r.images > 0 and r.images_per_s > 0 and r.train_seconds > 0
        assert all(0.0 <= getattr(r, k) <= 1.0 for k in "TUSH")
    c = tiny_dataset.feature_shape[0]
    d, g = tiny_dataset.class_side.word_vectors.shape
    assert rows[0].parameters == d * g + 4 * g * c  # V + W1, W2, W1_1, W2_1
    k, h, e = tiny_dataset.class_side.num_classes, 64, 32
    trained = (2 * d * h + h + h * c + c) + ((c + d) * h + h + h + 1) + (c * e + e + e * k + k + k * 2 + 2) + 2
    assert rows[1].parameters == trained  # G, D, student (E_S, C_S, H), sigmoid: the teacher is frozen


def test_family_prefixed_overrides_apply_to_that_family_only() -> None:
    from dedn.analysis.compare import own_overrides

    ov = ["epochs=2", "d3gzsl:model.hidden=8", "msdn:loss.gamma=0.5"]
    assert own_overrides("d3gzsl", ov) == {"epochs": "2", "model.hidden": "8"}
    assert own_overrides("dedn", ov) == {"epochs": "2"}
    with pytest.raises(ConfigError, match="model.name"):
        own_overrides("dedn", ["gpt:epochs=2"])


@pytest.mark.ray
@pytest.mark.slow  # the two families trained (`rows`)
def test_tables(rows, tmp_path) -> None:
    md = to_markdown(rows, title="tiny")
    lines = md.strip().splitlines()
    assert lines[:2] == ["tiny", ""] and lines[2].startswith("| model | T | U | S | H | images/s | parameters")
    assert lines[4].startswith("| msdn |") and lines[5].startswith("| d3gzsl |") and len(lines) == 6
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [p["model"] for p in parsed] == ["msdn", "d3gzsl"]
    assert float(parsed[0]["H"]) == rows[0].H and int(parsed[0]["parameters"]) == rows[0].parameters
    md_path, csv_path = write_table(rows, tmp_path / "out")
    assert md_path.read_text() == to_markdown(rows) and csv_path.read_text() == to_csv(rows)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_unknown_model_or_preset() -> None:
    with pytest.raises(ConfigError, match="model"):
        model_config("gpt", "cub")
    with pytest.raises(ConfigError, match="preset"):
        model_config("msdn", "CUB", preset="imagenet")


def test_job_refuses_missing_data(tmp_path) -> None:
    """The job end to end (its table, its MLflow runs): tests/test_toy_family.py, a family next to DEDN."""
    job = load_job("compare")
    assert job.main(["--data", str(tmp_path / "missing"), "--no-track", "--out", str(tmp_path / "job")]) == 2
