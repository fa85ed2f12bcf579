"""Tests of dedn.tuning: search-space loading, the lambda fit against brute force, a 2-trial sweep."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SWEEP_TRIALS, poison_test_shards
from dedn.errors import ConfigError
from dedn.tuning import Dimension, best_config, default_space_path, load_search_space, plot_hparams, plot_lambda_curves


# ---- search space ------------------------------------------------------------------------------
# docs/sweeps.md (the default space, dedn/families/dedn/search_space.yaml)
def test_default_space_is_the_documented_one() -> None:
    space = load_search_space(default_space_path())
    dims = {d.key: d for d in space.dims}
    assert set(dims) == {"loss.beta", "loss.gamma", "loss.epsilon"}
    assert (dims["loss.beta"].kind, dims["loss.beta"].low, dims["loss.beta"].high) == ("loguniform", 1e-4, 1e-1)
    assert (dims["loss.gamma"].kind, dims["loss.gamma"].low, dims["loss.gamma"].high) == ("loguniform", 1e-3, 1.0)
    assert (dims["loss.epsilon"].kind, dims["loss.epsilon"].low, dims["loss.epsilon"].high) == ("uniform", 0.0, 3.0)
    assert {d.key for d in space.lambda_dims} == {"eval.lambda_rc", "eval.lambda_e"}
    assert all((d.low, d.high) == (0.0, 1.0) for d in space.lambda_dims)
    assert (space.metric, space.mode) == ("val_H", "max")
    # lambdas join the Tune space only when searched
    assert set(space.param_space(False)) == {"loss.beta", "loss.gamma", "loss.epsilon"}
    assert set(space.param_space(True)) == {"loss.beta", "loss.gamma", "loss.epsilon", "eval.lambda_rc", "eval.lambda_e"}


def test_msdn_space_is_msdn_hyperparameters_and_valid_keys() -> None:
    from dedn.config import build_config, known_keys

    space = load_search_space(model="msdn")
    assert Path(space.source).parts[-3:] == ("families", "msdn", "search_space.yaml")  # shipped in the package
    keys = {d.key for d in space.dims}
    assert keys == {"loss.gamma", "loss.calibration_weight", "eval.calibration"}
    assert {d.key for d in space.lambda_dims} == {"eval.w1"}  # MSDN's own weight, under its own name
    assert keys <= set(known_keys("msdn"))
    cfg = build_config("cub", ["model=msdn"])  # the sweep's base: MSDN's own preset
    for d in space.dims:  # every corner of the space is a valid MSDN config
        for v in (d.low, d.high):
            assert cfg.replace(**{d.key: v}).model.name == "msdn"


def test_d3gzsl_space_covers_the_issue_dimensions_with_valid_keys() -> None:
    from dedn.config import build_config, known_keys

    space = load_search_space(model="d3gzsl")
    keys = {d.key for d in space.dims}
    assert keys == {"loss.w_cls", "loss.w_od", "loss.w_kd", "loss.n_critic", "eval.syn_per_class", "optim.lr",
                    "loss.lr_student"}  # distillation weights, critic steps, synthetic rows, learning rates
    assert {d.key for d in space.lambda_dims} == {"eval.w_student"} and keys <= set(known_keys("d3gzsl"))
    cfg = build_config("cub", ["model=d3gzsl"])
    for d in space.dims:  # every corner of the space is a valid D3GZSL config
        for v in ((d.low, d.high) if d.kind != "choice" else d.values):
            assert cfg.replace(**{d.key: v}).model.name == "d3gzsl"


def test_space_domains_sample_inside_bounds() -> None:
    space = load_search_space(default_space_path())
    ps = space.param_space(True)
    rng = np.random.default_rng(0)
    for key, dom in ps.items():
        d = next(x for x in space.dims + space.lambda_dims if x.key == key)
        xs = np.asarray(dom.sample(size=200, random_state=rng), dtype=float)
        assert xs.min() >= d.low and xs.max() <= d.high
    # log-uniform: about half the samples below the geometric mean
    beta = np.asarray(ps["loss.beta"].sample(size=2000, random_state=rng))
    assert 0.45 < np.mean(beta < math.sqrt(1e-4 * 1e-1)) < 0.55


def _write(tmp_path: Path, doc: object) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("doc, field", [
    ({"space": {"loss.nope": {"type": "uniform", "low": 0, "high": 1}}}, "space.loss.nope"),
    ({"space": {"loss.beta": {"type": "gaussian", "low": 0, "high": 1}}}, "space.loss.beta.type"),
    ({"space": {"loss.beta": {"type": "loguniform", "low": 0, "high": 1}}}, "space.loss.beta.low"),
    ({"space": {"loss.beta": {"type": "uniform", "low": 1, "high": 0.5}}}, "space.loss.beta"),
    ({"space": {"loss.beta": {"type": "uniform", "low": -1, "high": 0.5}}}, "space.loss.beta"),  # beta >= 0
    ({"space": {"loss.beta": {"type": "uniform", "low": 0, "high": 1}},
      "lambdas": {"eval.lambda_e": {"type": "uniform", "low": 0, "high": 1.5}}}, "space.eval.lambda_e"),
    ({"space": {"loss.beta": {"type": "uniform", "low": 0, "high": 1}}, "metric": "test_H"}, "metric"),
    ({"space": {}}, "space"),
    ({"space": {"loss.beta": {"type": "choice", "values": []}}}, "space.loss.beta.values"),
    ({"space": {"loss.beta": {"type": "uniform", "low": 0, "high": 1}}, "asha": {"grace_period": 0}}, "asha.grace_period"),
])
def test_bad_space_names_the_field(tmp_path: Path, doc: object, field: str) -> None:
    p = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as e:
        load_search_space(p)
    assert e.value.key == field
    assert str(p) in str(e.value)


def test_missing_or_malformed_space_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"space: expected a readable YAML file, found '.*none.yaml: No such file"):
        load_search_space(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("space: {beta: [1, 2\n")
    with pytest.raises(ConfigError, match=r"space: expected valid YAML, found .*bad.yaml at line 2, column 1"):
        load_search_space(tmp_path / "bad.yaml")


def test_choice_and_int_dimensions(tmp_path: Path) -> None:
    p = _write(tmp_path, {"space": {"model.experts": {"type": "choice", "values": ["both", "coarse"]},
                                   "optim.batch_size": {"type": "int", "low": 8, "high": 16}}})
    space = load_search_space(p)
    assert space.dims == (Dimension("model.experts", "choice", values=("both", "coarse")),
                          Dimension("optim.batch_size", "int", 8.0, 16.0))
    xs = space.param_space(False)["optim.batch_size"].sample(size=500, random_state=np.random.default_rng(0))
    assert min(xs) == 8 and max(xs) == 16  # the upper bound is inclusive


def test_best_config_is_a_final_run() -> None:
    from dedn.config import build_config

    base = build_config("cub", ["optim.epochs=30"])
    cfg = best_config(base, {"loss.beta": 0.02, "loss.epsilon": 1.5}, 7, {"lambda_rc": 0.65, "lambda_e": 0.85})
    assert (cfg.protocol, cfg.optim.epochs, cfg.loss.beta, cfg.loss.epsilon) == ("final", 7, 0.02, 1.5)
    assert (cfg.eval.lambda_rc, cfg.eval.lambda_e, cfg.eval.fit_weights) == (0.65, 0.85, False)
    assert cfg.loss.gamma == base.loss.gamma


def test_plots_are_written(tmp_path: Path) -> None:
    rc = le = np.round(np.arange(0, 1.0001, 0.05), 2)
    h = np.outer(1 - (rc - 0.3) ** 2, 1 - (le - 0.8) ** 2) * 0.5  # (21, 21)
    p1 = plot_lambda_curves({"lambda_rc": rc, "lambda_e": le, "H": h}, {"lambda_rc": 0.3, "lambda_e": 0.8}, tmp_path / "l.png")
    p3 = plot_lambda_curves({"w1": rc, "H": h[:, 0]}, {"w1": 0.3}, tmp_path / "w.png")  # one weight (MSDN)
    rows = [{"val_H": 0.1 * i, "params": {"loss.beta": 10.0 ** -i, "loss.epsilon": i / 2}} for i in range(1, 4)]
    p2 = plot_hparams(rows, ["loss.beta", "loss.epsilon"], ["loss.beta"], "val_H", tmp_path / "h.png")
    for p in (p1, p2, p3):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_hparams_plot_marks_trials_asha_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dedn.tuning import plots

    drawn = {}

    def keep(fig, path, dpi=110):  # inspect the figure instead of writing it
        drawn["labels"] = fig.axes[0].get_legend_handles_labels()[1]
        drawn["hollow"] = [len(c.get_offsets()) for c in fig.axes[0].collections if len(c.get_facecolors()) == 0]
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    rows = [{"val_H": 0.1 * i, "epochs_run": e, "params": {"loss.beta": 10.0 ** -i}} for i, e in ((1, 1), (2, 1), (3, 4))]
    plots.plot_hparams(rows, ["loss.beta"], ["loss.beta"], "val_H", tmp_path / "h.png", max_epochs=4)
    assert drawn["labels"] == ["stopped early by ASHA (best epoch)", "best validation H"]
    assert drawn["hollow"] == [2]  # the two trials ASHA stopped after 1 of 4 epochs
    plots.plot_hparams(rows, ["loss.beta"], ["loss.beta"], "val_H", tmp_path / "h.png")  # no max: none marked
    assert "stopped early by ASHA (best epoch)" not in drawn["labels"]


# ---- with a tiny semi-synthetic dataset -----------------------------------------------------------
TINY = ["optim.epochs=2", "optim.max_steps_per_epoch=2", "optim.batch_size=16", "eval.batch_size=512"]


@pytest.fixture(scope="module")
def tiny_data(awa2_tiny: Path) -> Path:
    """AWA2's real class side with 16 x 2 x 2 synthetic feature maps (conftest's, shared by the session)."""
    return awa2_tiny


def _relay_without_ray(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A trial's report relay (dedn/tuning/trial.py) outside Ray and Tune: a list for `tune.report`
    (the real one needs a Tune session); the reports it got."""
    from ray import tune

    reported: list[dict] = []
    monkeypatch.setattr(tune, "report", reported.append)
    return reported


def test_trial_is_the_training_driver_on_a_selection_run(tiny_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial is `dedn.training.driver.train` (the one driver) with protocol select, whose report
    rounds the trial's own thread hands to Tune in order (rank 0's metrics, the checkpoint folder
    under Tune's key); a selection run's dataset is opened without its test shards."""
    import importlib
    import shutil
    from types import SimpleNamespace

    from dedn.config import build_config
    from dedn.training import driver

    trial_module = importlib.import_module("dedn.tuning.trial")
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    poisoned = poison_test_shards(data)

    seen: dict[str, object] = {}

    def fake_train(cfg, settings, *, callbacks=()):  # test double
        seen.update(protocol=cfg.protocol, fit=cfg.eval.fit_weights, beta=cfg.loss.beta, data=cfg.data.path,
                    track=settings.track, register=settings.register, workers=settings.num_workers,
                    callbacks=[type(c) for c in callbacks])
        driver.open_dataset(cfg)  # the driver's own check of a selection run's dataset
        for epoch, ckpt in ((1, None), (2, SimpleNamespace(path="/runs/t/select-epoch0002"))):  # the controller's rounds
            callbacks[0].after_report(None, [{"epoch": epoch}, {"epoch": -1}], ckpt)

    reported = _relay_without_ray(monkeypatch)
    monkeypatch.setattr(driver, "train", fake_train)
    base = build_config("awa2", TINY).to_dict()
    trial_module.trial({"loss.beta": 0.02}, base=base, data=str(data), workers=2)
    assert seen == {"protocol": "select", "fit": True, "beta": 0.02, "data": str(data), "track": False,
                    "register": False, "workers": 2, "callbacks": [trial_module._RelayReports]}
    assert reported == [{"epoch": 1}, {"epoch": 2, "checkpoint_path": "/runs/t/select-epoch0002"}]
    trial_module.trial({"eval.lambda_rc": 0.3}, base=base, data=str(data), search_lambdas=True)
    assert seen["fit"] is False

    def failing_train(cfg, settings, *, callbacks=()):
        raise ValueError("the run failed")

    monkeypatch.setattr(driver, "train", failing_train)
    with pytest.raises(ValueError, match="the run failed"):  # the trial fails as its run did
        trial_module.trial({}, base=base, data=str(data))

    def silent_train(cfg, settings, *, callbacks=()):  # a controller whose reports went elsewhere
        pass

    monkeypatch.setattr(driver, "train", silent_train)
    before = len(reported)
    with pytest.raises(RuntimeError, match="none of its reports reached this trial's node"):
        trial_module.trial({}, base=base, data=str(data))
    assert len(reported) == before
    for p, junk in poisoned.items():
        assert p.stat().st_atime == 1_000 and p.read_bytes() == junk, f"{p} was read"


def test_lambda_fit_equals_brute_force_through_the_network(tiny_data: Path) -> None:
    """The fit on cached score parts picks the same (lambda_rc, lambda_e) and H as running the
    network at every grid point (ties: closest to the configured pair, then the lowest grid index).
    docs/method.md#post-hoc-lambda-fit"""
    from dedn.config import build_config
    from dedn.families.base import weight_grid_values
    from dedn.protocol import ClassProtocol
    from dedn.data.reader import ShardReader
    from dedn.training import loop as engine
    from dedn.training.evaluate import evaluate
    from dedn.tuning import open_for_selection, validation_weight_grid

    def evaluate_at_lambdas(cfg, ds, model_state, pairs):  # the brute force: the network once per pair
        model = engine.model_from_state(cfg, ds, model_state)
        protocol = ClassProtocol.selection(ds.class_side)
        out = []
        for rc, e in pairs:
            at = cfg.replace(**{"eval.lambda_rc": float(rc), "eval.lambda_e": float(e)})
            seen, unseen = (ShardReader(ds, s, batch_size=cfg.eval.batch_size, shuffle=False) for s in ("val_seen", "val_unseen"))
            out.append(evaluate(model, seen, unseen, protocol, at, fit_weights=False).metrics)
        return out

    cfg = build_config("awa2", TINY + ["optim.epochs=1", "eval.weight_grid_step=0.125", "protocol=select"])
    ds = open_for_selection(tiny_data)
    res = engine.run_phase(cfg, ds, "select")
    assert res.best_state is not None and res.best.metrics is not None
    grid = weight_grid_values(cfg.eval.weight_grid_step)
    pairs = [(rc, e) for rc in grid for e in grid]
    brute = evaluate_at_lambdas(cfg, ds, res.best_state, pairs)
    h = np.array([m["H"] for m in brute])
    assert h.max() > 0  # something to choose
    top = np.flatnonzero(h >= h.max() - 1e-12)
    dist = [(pairs[i][0] - cfg.eval.lambda_rc) ** 2 + (pairs[i][1] - cfg.eval.lambda_e) ** 2 for i in top]
    i_best = int(top[int(np.argmin(dist))])
    assert (res.best.weights["lambda_rc"], res.best.weights["lambda_e"]) == pytest.approx(pairs[i_best], abs=1e-9)
    for k in ("H", "S", "U", "T"):
        assert res.best.metrics[k] == pytest.approx(brute[i_best][k], abs=1e-12)
    # the sweep's Figure 3 grid (WeightSearch counts from one pass) equals the brute force everywhere
    fig3 = validation_weight_grid(cfg, ds, res.best_state)
    np.testing.assert_allclose(fig3["H"], h.reshape(len(grid), len(grid)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fig3["lambda_rc"], grid)


# ---- a whole sweep on Ray ----------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.slow
def test_sweep_of_trials_at_once(sqlite_sweep, awa2_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest's sweep (SWEEP_TRIALS trials, all at once) on SQLite; test_team runs the same sweep on the team server."""
    import shutil

    from dedn import tracking
    from dedn.config import RunConfig

    summary, home = sqlite_sweep.summary, sqlite_sweep.home
    monkeypatch.setenv("DEDN_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")

    # every trial finished on validation data alone; the test shards were never opened for reading
    assert summary.num_trials == SWEEP_TRIALS
    for p in sqlite_sweep.poisoned:  # atime first: the content check below reads the file
        assert p.stat().st_atime == 1_000, f"{p} was read during the sweep"
    for p, junk in sqlite_sweep.poisoned.items():
        assert p.read_bytes() == junk

    # MLflow: one parent, a child per trial with per-epoch validation metrics
    c = tracking.client()
    exp = c.get_experiment_by_name("dedn-awa2-tune")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary.parent_run_id]
    assert len(runs) == SWEEP_TRIALS + 1 and len(parents) == 1 and len(children) == SWEEP_TRIALS
    assert parents[0].info.run_id == summary.parent_run_id and parents[0].info.status == "FINISHED"
    for ch in children:
        assert ch.info.status == "FINISHED"
        assert {"loss.beta", "loss.gamma", "loss.epsilon"} <= set(ch.data.params)
        hist = c.get_metric_history(ch.info.run_id, "val/H")  # keyed as a training run's (tracking.metric_key)
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [1, 2]  # no early stop: grace = epochs
        assert 0.0 <= ch.data.metrics["val/H"] <= 1.0 and 0.0 <= ch.data.metrics["val/lambda_e"] <= 1.0
    assert len({ch.data.params["loss.beta"] for ch in children}) == SWEEP_TRIALS  # every configuration a different one
    best_h = {r.data.tags["dedn.trial_id"]: max(m.value for m in c.get_metric_history(r.info.run_id, "val/H"))
              for r in children}
    # the summary's best trial holds the highest validation H logged by any child (ties allowed)
    assert best_h[summary.best_trial_id] == pytest.approx(max(best_h.values()), abs=1e-6)
    assert summary.best_val_H == pytest.approx(max(best_h.values()), abs=1e-6)
    artifacts = {a.path for a in c.list_artifacts(summary.parent_run_id)}
    assert {"best_config.yaml", "hparams.png", "lambda_curves.png", "summary.json"} <= artifacts

    # the best configuration: a complete config for the final run, at the best epoch and fitted lambdas
    sweep_dir = Path(summary.sweep_dir)
    assert sweep_dir == (home / "tune" / "sweep").resolve()
    # a trial's relayed reports stay on its node: none was copied into the sweep's results
    assert not list(sweep_dir.rglob(".dedn-reports-*")), "a trial's report file reached the sweep's storage"
    best = RunConfig.from_dict(yaml.safe_load((sweep_dir / "best_config.yaml").read_text()))
    assert (best.protocol, best.optim.epochs) == ("final", summary.best_epoch)
    assert (best.eval.lambda_rc, best.eval.lambda_e, best.eval.fit_weights) == (
        summary.weights["lambda_rc"], summary.weights["lambda_e"], False)
    assert best.loss.beta == summary.best_params["loss.beta"] and 1e-4 <= best.loss.beta <= 1e-1
    assert 1 <= summary.best_epoch <= 2
    grid = np.load(sweep_dir / "lambda_grid.npz")  # the Figure 3 grid, recomputed from the best weights
    i = int(np.argmin(np.abs(grid["lambda_rc"] - summary.weights["lambda_rc"])))
    j = int(np.argmin(np.abs(grid["lambda_e"] - summary.weights["lambda_e"])))
    assert grid["H"].shape == (21, 21) and grid["H"].max() == pytest.approx(summary.best_val_H, abs=1e-12)
    assert grid["H"][i, j] == pytest.approx(summary.best_val_H, abs=1e-12)

    # --final: the retrain registers with the best trial's validation tags and becomes champion
    from dedn.tuning import run_final

    for p in sqlite_sweep.poisoned:  # the final phase tests once: put the real test shards back
        shutil.copyfile(awa2_tiny / p.relative_to(sqlite_sweep.data), p)
    # (a second --final of the same sweep ties on validation H: the rule for ties is test_registry's)
    out = run_final(sweep_dir)
    tags = c.get_model_version(out.registered.name, out.registered.version).tags
    assert float(tags["val_H"]) == summary.best_val_H and out.registered.champion
    assert str(c.get_model_version_by_alias(out.registered.name, "champion").version) == str(out.registered.version)


def test_training_curves_of_a_final_only_run_have_no_empty_panel(tmp_path: Path) -> None:
    """A sweep's --final run validates nothing: one loss panel and no legend warning; a selection run: two panels."""
    import warnings

    import matplotlib.image as mpimg

    from dedn.analysis.plots import plot_training_curves

    rows = [{"epoch": e, "loss": 2.0 / e, "mal_c": 1.0 / e} for e in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" would fail here
        final_only = plot_training_curves(rows, tmp_path / "final.png", loss_keys=("loss", "mal_c"), title="t")
        with_val = plot_training_curves([{**r, "val_H": 0.1 * r["epoch"], "val_U": 0.2} for r in rows], tmp_path / "sel.png",
                                        loss_keys=("loss", "mal_c"), title="t")
    w_final, w_sel = mpimg.imread(final_only).shape[1], mpimg.imread(with_val).shape[1]
    assert w_final < 0.6 * w_sel  # one panel instead of two


# ---- GPUs per trial (issue 25, item 5): the arithmetic and the preflight, on CPUs ------------------
def test_a_trials_gpus_are_split_among_its_workers() -> None:
    from dedn.tuning.trial import DRIVER_CPUS, worker_resources

    assert worker_resources(2.0, 0.5, 1) == (2.0 - DRIVER_CPUS, 0.5)  # two trials share a GPU
    assert worker_resources(2.0, 1.0, 2) == ((2.0 - DRIVER_CPUS) / 2, 0.5)
    assert worker_resources(1.0, 0.0, 1)[1] == 0.0


def test_gpu_shares_are_checked_where_they_are_given() -> None:
    from dedn.config import build_config
    from dedn.training.settings import TrainSettings
    from dedn.tuning import SweepSpec

    assert TrainSettings(use_gpu=True).gpu_share == 1.0 and TrainSettings().gpu_share == 0.0
    assert TrainSettings(use_gpu=True, gpus_per_worker=0.25).gpu_share == 0.25
    with pytest.raises(ConfigError, match="settings.gpus_per_worker: expected 0 unless use_gpu"):
        TrainSettings(gpus_per_worker=0.5)
    with pytest.raises(ConfigError, match=r"settings.gpus_per_worker: expected a share of one GPU in \[0, 1\]"):
        TrainSettings(use_gpu=True, gpus_per_worker=2)
    base, space = build_config("cub"), load_search_space(default_space_path())
    assert SweepSpec(data="d", base=base, space=space, gpus_per_trial=0.25).gpus_per_trial == 0.25
    for bad, workers in ((-1.0, 1), (1.5, 1), (2.5, 2)):
        with pytest.raises(ConfigError, match=f"sweep.gpus_per_trial: expected between 0 and {workers}"):
            SweepSpec(data="d", base=base, space=space, gpus_per_trial=bad, workers_per_trial=workers)


def test_a_gpu_trial_trains_on_its_share(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dedn.config import build_config
    from dedn.training import driver
    from dedn.tuning import trial

    seen: dict[str, object] = {}
    _relay_without_ray(monkeypatch)

    def fake_train(cfg, settings, *, callbacks=()):  # test double: one report round
        seen.update(gpu=settings.use_gpu, share=settings.gpu_share, workers=settings.num_workers)
        callbacks[0].after_report(None, [{"epoch": 1}], None)

    monkeypatch.setattr(driver, "train", fake_train)
    trial({}, base=build_config("awa2", TINY).to_dict(), data=str(tiny_data), workers=2, gpus_per_worker=0.125)
    assert seen == {"gpu": True, "share": 0.125, "workers": 2}


def test_what_a_cluster_lacks_for_one_trial_is_named() -> None:
    from dedn.training.preflight import trial_resource_problem

    assert trial_resource_problem({"CPU": 2.0}, 1, cpus=1, gpus=0) is None
    assert trial_resource_problem({"CPU": 8.0, "GPU": 1.0}, 2, cpus=2, gpus=0.25) is None
    assert trial_resource_problem({"CPU": 2.0}, 1, cpus=1, gpus=0.5) == \
        "one trial needs 0.5 GPUs; the cluster has 2 CPUs and 0 GPUs on 1 node(s)"
    assert trial_resource_problem({"CPU": 2.0, "GPU": 1.0}, 1, cpus=4, gpus=2) == \
        "one trial needs 4 CPUs and 2 GPUs; the cluster has 2 CPUs and 1 GPUs on 1 node(s)"


@pytest.mark.ray
@pytest.mark.slow  # the test itself is instant; starting the session's Ray is not
@pytest.mark.timeout(120)
def test_a_sweep_asking_for_gpus_the_cluster_lacks_fails_before_any_trial(tiny_data: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from dedn.config import build_config
    from dedn.tuning import SweepSpec, run_sweep

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    base = build_config("awa2", TINY + [f"data.path={tiny_data}"])
    spec = SweepSpec(data=str(tiny_data), base=base, space=load_search_space(default_space_path()), num_samples=2,
                     gpus_per_trial=0.5, storage=str(tmp_path / "tune"), name="gpu", verbose=0)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"one trial needs 0.5 GPUs; the cluster has \d+ CPUs and 0 GPUs"):
        run_sweep(spec)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "tune" / "gpu").exists()
