"""Model registry: models-from-code pyfunc round trip, champion alias rule, new classes at inference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def _model_and_batch(ds, seed: int = 0):
    from dedn.training import loop as engine
    from dedn.config import build_config
    from dedn.data.reader import ShardReader

    cfg = build_config("cub", [f"optim.seed={seed}", "eval.lambda_rc=0.7", "eval.lambda_e=0.6", f"data.path={ds.root}"])
    model = engine.build_model(cfg, ds.class_side, ds.feature_shape).eval()
    x = next(iter(ShardReader(ds, "test_unseen", batch_size=6, shuffle=False))).features  # (6, C, H, W)
    return cfg, model, x


def _register(cfg, model, ds, val_h: float, example=None, *, class_side=None, semi_synthetic: bool = True):
    from dedn import tracking
    from dedn.tracking import registry

    run_id = tracking.start_training_run(cfg, name="t", semi_synthetic=semi_synthetic).run_id
    val = {"T": 0.5, "U": 0.4, "S": 0.3, "H": val_h}
    return registry.register_model(model, cfg, class_side or ds.class_side, run_id=run_id, val_metrics=val,
                                   test_metrics={"T": 0.1, "U": 0.1, "S": 0.1, "H": 0.1},
                                   input_example=None if example is None else example.numpy(),
                                   semi_synthetic=semi_synthetic)


@pytest.mark.timeout(120)
def test_round_trip_by_alias_scores_match_in_process_model(store, tiny_dataset):
    import mlflow

    from dedn import tracking
    from dedn.tracking import registry

    cfg, model, x = _model_and_batch(tiny_dataset)
    v = _register(cfg, model, tiny_dataset, val_h=0.2, example=x)
    assert v.champion and v.version == "1"
    pred = registry.load_predictor("models:/dedn-cub@champion")
    with torch.no_grad():
        want = model(x).inference_scores(0.7, 0.6).numpy()  # (6, K)
    got = pred.scores(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the plain pyfunc interface gives the same scores
    np.testing.assert_allclose(mlflow.pyfunc.load_model("models:/dedn-cub/1").predict(x.numpy()), want, rtol=1e-5, atol=1e-6)
    # the logged model holds no pickle: weights, YAML, npz, JSON and the code file only
    local = Path(mlflow.artifacts.download_artifacts("models:/dedn-cub/1"))
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pickle"))
    assert (local / "MLmodel").read_text().count("pyfunc_model.py") >= 1
    tags = tracking.client().get_model_version("dedn-cub", "1").tags
    assert tags["val_H"] == "0.2" and tags["test_H"] == "0.1"  # repr: the value itself, unrounded


@pytest.mark.timeout(120)
def test_champion_moves_only_on_better_validation_h(store, tiny_dataset):
    from dedn import tracking

    cfg, model, _ = _model_and_batch(tiny_dataset)
    assert _register(cfg, model, tiny_dataset, val_h=0.30).champion
    worse = _register(cfg, model, tiny_dataset, val_h=0.25)
    assert not worse.champion and worse.previous_champion_val_H == pytest.approx(0.30)
    assert tracking.client().get_model_version_by_alias("dedn-cub", "champion").version in (1, "1")
    better = _register(cfg, model, tiny_dataset, val_h=0.35)
    assert better.champion and better.version == "3"
    # a tie keeps the current champion, and says why
    tie = _register(cfg, model, tiny_dataset, val_h=0.35)
    assert not tie.champion and tie.champion_version == "3" and "stays on version 3" in tie.champion_line()
    # values are compared unrounded: beating 0.35 in the 9th digit is better
    finer = _register(cfg, model, tiny_dataset, val_h=0.350000001)
    assert finer.champion and finer.version == "5"
    assert str(tracking.client().get_model_version_by_alias("dedn-cub", "champion").version) == "5"


def _real_shaped(ds, shape=(32, 1, 1)):
    """A model of the same dataset name and class side on features of another shape (real-shaped, not semi-synthetic)."""
    from dedn.training import loop as engine
    from dedn.config import build_config

    cfg = build_config("cub", ["eval.lambda_rc=0.7", "eval.lambda_e=0.6", f"data.path={ds.root}-real"])
    return cfg, engine.build_model(cfg, ds.class_side, shape).eval()


@pytest.mark.timeout(180)
def test_champion_follows_new_data_and_says_so(store, tiny_dataset):
    """Issue 27, item 2: a version on other data (feature shape, class side, semi-synthetic or not) never
    competes with the champion on validation H alone: the alias follows the newest data and says so."""
    from dedn import tracking

    cfg, model, _ = _model_and_batch(tiny_dataset)
    first = _register(cfg, model, tiny_dataset, val_h=0.50)  # semi-synthetic 16 x 2 x 2
    assert first.champion and first.champion_line() == "alias champion set"
    real_cfg, real = _real_shaped(tiny_dataset)
    second = _register(real_cfg, real, tiny_dataset, val_h=0.30, semi_synthetic=False)  # real-shaped 32 x 1 x 1
    line = second.champion_line()
    assert second.champion and second.version == "2", line
    assert str(tracking.client().get_model_version_by_alias("dedn-cub", "champion").version) == "2"
    assert line.startswith("alias champion moved here: data differs from version 1's (")
    assert "feature shape [16, 2, 2] -> [32, 1, 1]" in line and "semi-synthetic -> real features" in line
    assert "versions of other data no longer compete" in line
    # the version records its data
    tags = tracking.client().get_model_version("dedn-cub", "2").tags
    assert tags["data_name"] == "CUB" and tags["data_feature_shape"] == "[32, 1, 1]" and tags["semi_synthetic"] == "false"
    assert tags["data_class_side"] == tracking.client().get_model_version("dedn-cub", "1").tags["data_class_side"]
    # on the new data, validation H decides again; version 1 (better H, other data) no longer competes
    worse = _register(real_cfg, real, tiny_dataset, val_h=0.20, semi_synthetic=False)
    assert not worse.champion and worse.champion_version == "2" and "stays on version 2" in worse.champion_line()
    better = _register(real_cfg, real, tiny_dataset, val_h=0.40, semi_synthetic=False)
    assert better.champion and better.champion_line() == "alias champion moved here"
    # back to the semi-synthetic data: its versions compete among themselves, the best of them (1) is champion
    back = _register(cfg, model, tiny_dataset, val_h=0.10)
    assert not back.champion and back.champion_version == "1"
    assert back.champion_line().startswith("alias champion moved to version 1, the best version on this data"), back.champion_line()
    assert "data differs from version 4's (feature shape [32, 1, 1] -> [16, 2, 2]" in back.champion_line()


@pytest.mark.timeout(180)
def test_versions_registered_before_data_identity_are_told_apart(store, tiny_dataset):
    from dedn import tracking
    from dedn.tracking import registry

    cfg, model, _ = _model_and_batch(tiny_dataset)
    _register(cfg, model, tiny_dataset, val_h=0.50)
    c = tracking.client()
    for k in registry.IDENTITY_TAGS:  # as registered before versions recorded their data
        if k != "semi_synthetic":
            c.delete_model_version_tag("dedn-cub", "1", k)
    second = _register(cfg, model, tiny_dataset, val_h=0.30)
    assert second.champion, second.champion_line()
    assert "version 1 records no data identity" in second.champion_line()
    assert "versions of other data no longer compete" in second.champion_line()


@pytest.mark.timeout(120)
def test_new_class_attribute_vector_adds_a_score_column(store, tiny_dataset):
    from dedn.tracking import registry

    cfg, model, x = _model_and_batch(tiny_dataset)
    _register(cfg, model, tiny_dataset, val_h=0.2)
    pred = registry.load_predictor("models:/dedn-cub@champion")
    cs = tiny_dataset.class_side
    k = cs.num_classes
    u = int(cs.unseen_classes[0])
    # new class 1: a scaled copy of unseen class u's raw attributes (row normalisation makes it u's twin);
    # new class 2: a different vector, checked against O A^T computed by hand
    rng = np.random.default_rng(0)
    other = rng.random(cs.num_attributes).astype(np.float32)
    extra = np.stack([3.0 * cs.attributes_raw[u], other])  # (2, D)
    base = pred.scores(x)
    z = pred.scores(x, extra)
    assert z.shape == (x.shape[0], k + 2)
    np.testing.assert_allclose(z[:, :k], base, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z[:, k], base[:, u], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = model(x)
        a = torch.from_numpy(other / np.linalg.norm(other))  # (D,)
        parts = {n: p for n, p in out.score_parts().items()}
        o = {"P_rc": out.coarse.o_region, "P_cc": out.coarse.o_channel, "P_rf": out.fine.o_region, "P_cf": out.fine.o_channel}
        hand = 0.6 * (0.7 * o["P_rc"] + 0.3 * o["P_cc"]) @ a + 0.4 * (0.7 * o["P_rf"] + 0.3 * o["P_cf"]) @ a  # (B,)
        assert set(parts) == set(o)
    np.testing.assert_allclose(z[:, k + 1], hand.numpy(), rtol=1e-4, atol=1e-5)
    ids = pred.predict(x, extra)
    assert ids.shape == (x.shape[0],) and ids.max() < k + 2
    assert list(pred.kind(np.array([int(cs.seen_classes[0]), u, k]))) == ["seen", "unseen", "new"]


def test_extra_classes_file_errors_name_the_file(tmp_path: Path):
    from dedn.errors import DatasetError
    from dedn.tracking.registry import read_extra_classes

    p = tmp_path / "new.csv"
    p.write_text("name,a1,a2\nzebra_like,1,0\n")
    with pytest.raises(DatasetError, match="new.csv: columns: expected name \\+ 3 attribute columns"):
        read_extra_classes(p, 3)
    p.write_text("name,a1,a2\nzebra_like,1,nan\n")
    with pytest.raises(DatasetError, match="finite"):
        read_extra_classes(p, 2)
    names, values = read_extra_classes(_ok(tmp_path), 2)
    assert names == ["x", "y"] and values.tolist() == [[1.0, 0.0], [0.5, 2.0]]


def _ok(tmp_path: Path) -> Path:
    p = tmp_path / "ok.csv"
    p.write_text("name,a1,a2\nx,1,0\ny,0.5,2\n")
    return p


def test_a_new_store_keeps_every_experiment_under_dedn_home(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The Default experiment MLflow creates with a new store too: not ./mlruns of the current directory
    (under `ray job submit` a temporary folder)."""
    from dedn import tracking

    monkeypatch.chdir(tmp_path)
    tracking.init_store()
    c = tracking.client()
    assert c.get_experiment("0").artifact_location == (store / "mlartifacts" / "0").as_uri()
    exp_id = tracking.get_or_create_experiment("dedn-cub")
    assert c.get_experiment(exp_id).artifact_location == (store / "mlartifacts" / "dedn-cub").as_uri()
    assert not (tmp_path / "mlruns").exists()


def test_metric_keys_group_a_run_into_ui_sections():
    """MLflow's UI draws one chart section per key prefix: every training metric gets one."""
    from dedn.tracking import metric_key

    weights = ("lambda_rc", "lambda_e")
    expect = {"val_H": "val/H", "val_T": "val/T", "best_val_H": "val/best_H", "lambda_e": "val/lambda_e",
              "test_U": "test/U", "loss": "train/loss", "mal_c": "train/mal_c", "final_loss": "final/loss",
              "final_images_per_s": "final/images_per_s", "images_per_s": "perf/images_per_s",
              "worker_peak_rss_mib": "perf/worker_peak_rss_mib", "data_resident_mib": "perf/data_resident_mib"}
    assert {k: metric_key(k, weights) for k in expect} == expect
    assert metric_key("lambda_e") == "train/lambda_e"  # a weight only where the family names it


def test_run_page_links_the_server_or_the_local_ui():
    from dedn.tracking import run_page

    assert run_page("https://mlflow.team:5000/", "3", "ab12") == "https://mlflow.team:5000/#/experiments/3/runs/ab12"
    assert run_page("sqlite:////home/u/.dedn/mlflow.db", "1", "ab12") == "http://127.0.0.1:5000/#/experiments/1/runs/ab12"


class _Version:
    def __init__(self, version: str, val_h: str = ""):
        self.version, self.tags = version, {"val_H": val_h}


class _RacingClient:
    """Two versions, val_H 0.3 and 0.5. The first alias write meets another registrant's first write:
    the server answers as MLflow's SQL store does on PostgreSQL (its look-up-then-insert broke the key)."""

    def __init__(self, error: str):
        self.error, self.alias, self.writes = error, None, 0
        self.versions = [_Version("1", "0.3"), _Version("2", "0.5")]

    def search_model_versions(self, query: str) -> list[_Version]:
        return self.versions

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        from mlflow.exceptions import RestException

        self.writes += 1
        if self.writes == 1:
            self.alias = "1"  # the other registrant's write, which won the insert
            raise RestException({"error_code": "BAD_REQUEST", "message": self.error})
        self.alias = version

    def get_model_version_by_alias(self, name: str, alias: str) -> _Version:
        return _Version(self.alias)


PG_ALIAS_RACE = ('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint '
                 '"registered_model_alias_pk"\nDETAIL:  Key (workspace, name, alias)=(default, toy, champion) already exists.')


def test_a_lost_race_for_the_first_champion_write_is_written_again(monkeypatch: pytest.MonkeyPatch):
    from dedn.tracking import registry

    fake = _RacingClient(PG_ALIAS_RACE)
    monkeypatch.setattr(registry.tracking, "client", lambda: fake)
    monkeypatch.setattr(registry.time, "sleep", lambda s: None)
    assert registry.promote_best("toy") == "2"
    assert (fake.alias, fake.writes) == ("2", 2)


def test_other_alias_errors_are_not_taken_for_a_race(monkeypatch: pytest.MonkeyPatch):
    from mlflow.exceptions import RestException

    from dedn.tracking import registry

    fake = _RacingClient("Registered model 'toy' version 2 not found")
    monkeypatch.setattr(registry.tracking, "client", lambda: fake)
    monkeypatch.setattr(registry.time, "sleep", lambda s: None)
    with pytest.raises(RestException, match="not found"):
        registry.promote_best("toy")
    assert fake.writes == 1
