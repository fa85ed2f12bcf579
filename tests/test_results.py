"""Tests of dedn.tracking.results and jobs/results_table.py against a throw-away MLflow store."""
from __future__ import annotations

import pytest

from dedn.tracking import results
from dedn.errors import ConfigError
from toydata import load_job


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); tests use distinct dataset names."""
    from dedn import tracking

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEDN_HOME", str(tmp_path_factory.mktemp("results") / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.init_store()
        yield tracking.client()


def _run(client, dataset: str, *, test: dict, val_h: float | None, semi: bool = True, status: str = "FINISHED",
         extra_tags: dict | None = None, experiment: str | None = None) -> str:
    from dedn import tracking

    exp = tracking.get_or_create_experiment(experiment or tracking.experiment_name(dataset))
    tags = {"dataset": dataset, "variant": "paper", "semi_synthetic": str(semi).lower(), **(extra_tags or {})}
    run = client.create_run(exp, run_name=f"{dataset}-{len(client.search_runs([exp]))}", tags=tags)
    rid = run.info.run_id
    for k, v in test.items():
        client.log_metric(rid, f"test/{k}", v)
    if val_h is not None:
        client.log_metric(rid, "val/best_H", val_h)
    client.set_terminated(rid, status)
    return rid


M1 = {"T": 0.612, "U": 0.5, "S": 0.4, "H": 0.4444}
M2 = {"T": 0.9, "U": 0.9, "S": 0.9, "H": 0.9}


def test_best_run_is_chosen_on_validation_not_test(store):
    good = _run(store, "CUB", test=M1, val_h=0.50)
    _run(store, "CUB", test=M2, val_h=0.30)  # better test, worse validation: must not win
    _run(store, "CUB", test=M2, val_h=0.99, extra_tags={"mlflow.parentRunId": "x", "dedn.kind": "ablation"})
    _run(store, "CUB", test=M2, val_h=0.99, status="FAILED")
    _run(store, "CUB", test={"T": 0.9}, val_h=0.99)  # no complete test metrics
    e = results.from_runs("CUB", store)
    assert e is not None and e.run_id == good and e.metrics == M1 and e.val_H == 0.50
    assert e.semi_synthetic and e.source == "runs" and e.extra["candidates"] == 2
    assert results.from_runs("SUN", store) is None


def test_champion_version_from_the_registry(store):
    rid = _run(store, "AWA2", test=M1, val_h=0.5, semi=False)
    store.create_registered_model("dedn-awa2")
    mv = store.create_model_version("dedn-awa2", source=f"runs:/{rid}/model", run_id=rid)
    for k, v in {**{f"test_{k}": f"{v:.6f}" for k, v in M2.items()}, "val_H": "0.800000", "run_id": rid,
                 "variant": "reference", "semi_synthetic": "true"}.items():
        store.set_model_version_tag("dedn-awa2", mv.version, k, v)
    assert results.from_registry("AWA2", store) is None  # no champion alias yet
    store.set_registered_model_alias("dedn-awa2", "champion", mv.version)
    e = results.from_registry("AWA2", store)
    assert e.metrics == M2 and e.val_H == 0.8 and e.variant == "reference" and e.model == f"dedn-awa2/{mv.version} (@champion)"
    assert e.semi_synthetic is False  # the run's own tag wins over the copy on the version
    assert results.from_registry("CUB", store) is None


def test_table1_layout_golden():
    entries = {
        "CUB": results.ResultEntry("CUB", M1, True, "runs", "r1", "run-a", "paper", 0.5),
        "SUN": None,
        "AWA2": results.ResultEntry("AWA2", M2, False, "registry", "r2", "dedn-awa2/1 (@champion)", "paper"),
    }
    md = results.format_table1(entries)
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == ("| Method | CUB† T | CUB† U | CUB† S | CUB† H | SUN T | SUN U | SUN S | SUN H "
                        "| AWA2 T | AWA2 U | AWA2 S | AWA2 H |")
    assert table[2] == "| DEDN (this code) | 61.2 | 50.0 | 40.0 | 44.4 | - | - | - | - | 90.0 | 90.0 | 90.0 | 90.0 |"
    assert table[3] == ("| DEDN (paper, Table 1) | 77.4 | 70.9 | 70.0 | 70.4 | 67.4 | 54.7 | 36.0 | 43.5 "
                        "| 75.8 | 68.0 | 76.5 | 72.0 |")
    assert any(ln.startswith("† semi-synthetic") for ln in lines)
    assert "- SUN: nothing in the store" in lines
    assert "DEDN (paper" not in results.format_table1(entries, include_paper=False)
    assert "†" not in results.format_table1({"AWA2": entries["AWA2"]})
    with pytest.raises(ConfigError, match="results.source"):
        results.collect(["CUB"], "tensorboard", client=object())


def test_results_table_job(store, tmp_path, capsys):
    _run(store, "APY", test=M1, val_h=0.5)
    job = load_job("results_table")
    out = tmp_path / "t1.md"
    assert job.main(["--datasets", "APY", "SUN", "--source", "runs", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| DEDN (this code) | 61.2 | 50.0 | 40.0 | 44.4 | - | - | - | - |" in printed
    assert out.read_text() in printed and "APY†" in out.read_text()
    assert job.main(["--datasets", "SUN", "--source", "registry"]) == 1  # nothing at all: non-zero
