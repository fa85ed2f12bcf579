"""Training callbacks (dedn.training.callbacks) and the test-side faults plugin (tests/faults.py), in process.

The same plugin through Ray Train, a restart and a full disk: tests/test_distributed.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import faults
from dedn.config import RunConfig
from dedn.errors import ConfigError, NonFiniteLossError
from dedn.training.callbacks import PLUGINS_ENV, Callback, CallbackList, WorkerContext, load_callbacks, plugin_specs
from dedn.training.loop import run_protocol

TINY = {"optim.batch_size": 32, "optim.max_steps_per_epoch": 3, "optim.lr": 0.001, "eval.fit_weights": False,
        "eval.weight_grid_step": 0.25, "data.shuffle_buffer": 64, "optim.epochs": 2}


def _train(dataset, *callbacks: Callback, protocol: str = "two_phase") -> tuple[list[torch.nn.Module], object]:
    """run_protocol with the callbacks wired as the driver's worker wires them (one process)."""
    cfg = RunConfig().replace(**TINY, protocol=protocol)
    cbs = CallbackList(callbacks)
    cbs.on_start(WorkerContext(0, 1, torch.device("cpu"), cfg, "select", 1, False))
    trained: list[torch.nn.Module] = []

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        trained[:] = [model]
        return cbs.wrap_model(model)

    result = run_protocol(cfg, dataset, sinks=[cbs], wrap_model=wrap)
    cbs.on_end(trained[0])
    return trained, result


def test_plugin_names_come_from_settings_then_the_environment():
    env = {PLUGINS_ENV: "faults:Faults, faults:plugin"}
    want = {"faults:Faults": {"fail_rank": 0}, "faults:plugin": {}}  # the settings' options win
    assert plugin_specs({"faults:Faults": {"fail_rank": 0}}, env) == want
    env = {PLUGINS_ENV: json.dumps({"faults:Faults": {"record_dir": "/x"}})}
    assert plugin_specs({}, env, check=True) == {"faults:Faults": {"record_dir": "/x"}}
    assert plugin_specs(None, {}) == {}
    with pytest.raises(ConfigError, match=r"environment: DEDN_TRAIN_PLUGINS: expected an importable .*no_such_module"):
        plugin_specs({}, {PLUGINS_ENV: "no_such_module:x"}, check=True)
    with pytest.raises(ConfigError, match=r"TrainSettings: settings.plugins: expected module:callable naming a "):
        plugin_specs({"faults:nothing_here": {}}, {}, check=True)
    with pytest.raises(ConfigError, match=r"settings.plugins: expected module:callable"):
        plugin_specs({"faults": {}}, {}, check=True)
    with pytest.raises(ConfigError, match="JSON-able"):
        plugin_specs({"faults:Faults": {"x": object()}}, {})
    with pytest.raises(ConfigError, match="DEDN_TRAIN_PLUGINS"):
        plugin_specs({}, {PLUGINS_ENV: "{not json"})


def test_preflight_checks_the_plugins_before_ray(tiny_dataset):
    from dedn.config import build_config
    from dedn.training.driver import TrainSettings
    from dedn.training.preflight import preflight

    cfg = build_config("cub", [f"data.path={tiny_dataset.root}"])
    with pytest.raises(ConfigError, match="settings.plugins.*no_such_module"):
        preflight(cfg, TrainSettings(track=False, plugins={"no_such_module:make": {}}))


def test_load_callbacks_calls_each_plugin_with_its_options():
    got = load_callbacks({"faults:Faults": {"fail_rank": 0}, "builtins:list": {}})  # list() -> [] : no callbacks
    assert len(got) == 1 and isinstance(got[0], faults.Faults) and got[0].fail_rank == 0


def test_records_each_epochs_rows_and_the_trained_networks_digest(tiny_dataset, tmp_path: Path):
    record = tmp_path / "record"
    trained, result = _train(tiny_dataset, faults.Faults(record_dir=str(record)))
    r0 = json.loads((record / "rank0.json").read_text())
    assert sorted(r0["seen"]) == ["final", "select"]
    assert sorted(r0["seen"]["select"]) == ["1", "2"] and sorted(r0["seen"]["final"]) == [str(result.selection.epoch)]
    assert all(len(rows) == 3 * 32 for rows in r0["seen"]["select"].values())  # 3 steps of 32 rows
    # the trained network itself, as the final checkpoint holds it
    assert r0["params"] == faults.params_digest(trained[0]) == faults.state_digest(result.final.state["model"])


def test_a_raise_fault_fires_once_per_marker_after_the_first_step(tiny_dataset, tmp_path: Path):
    marker = tmp_path / "marker"
    with pytest.raises(faults.InjectedFault, match="rank 0, select epoch 2"):
        _train(tiny_dataset, faults.Faults(fail_rank=0, fail_epoch=2, fail_marker=str(marker)), protocol="select")
    assert "rank 0 failed at epoch 2" in marker.read_text()
    # the marker exists: no fault; rank 1's fault is not rank 0's
    _train(tiny_dataset, faults.Faults(fail_rank=0, fail_epoch=2, fail_marker=str(marker)),
           faults.Faults(fail_rank=1, fail_epoch=2, fail_marker=str(tmp_path / "other")), protocol="select")
    assert not (tmp_path / "other").exists()


def test_a_nan_fault_is_a_non_finite_loss(tiny_dataset, tmp_path: Path):
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2: loss: expected a finite value, found loss=nan"):
        _train(tiny_dataset, faults.Faults(fail_rank=0, fail_epoch=2, fail_marker=str(tmp_path / "m"), fail_kind="nan"),
               protocol="select")


def test_a_disk_full_fault_limits_file_size_inside_the_checkpoint_write_only(tiny_dataset, tmp_path: Path):
    from dedn.training.report import Best, EpochReport

    f = faults.Faults(fail_rank=0, fail_epoch=2, fail_marker=str(tmp_path / "m"), fail_kind="disk_full")
    cbs = CallbackList([f])
    cbs.on_start(WorkerContext(0, 1, torch.device("cpu"), RunConfig(), "select", 1, False))
    big = b"x" * 4096
    report = EpochReport("select", 1, 3, {}, 1, 1, 1.0, 0.0, 0.0, Best())
    with cbs.around_checkpoint_write(report):  # epoch 1: no fault
        (tmp_path / "a").write_bytes(big)
    report.epoch = 2
    with pytest.raises(OSError, match="File too large"):
        with cbs.around_checkpoint_write(report):
            (tmp_path / "b").write_bytes(big)
    assert (tmp_path / "b").stat().st_size <= 1024 and (tmp_path / "m").exists()
    (tmp_path / "c").write_bytes(big)  # the limit is lifted after the block
    with cbs.around_checkpoint_write(report):  # once per marker
        (tmp_path / "d").write_bytes(big)


def test_bad_fault_options_fail_in_the_test():
    with pytest.raises(ValueError, match="fail_kind"):
        faults.plugin(fail_kind="boom")
    with pytest.raises(ValueError, match="fail_marker"):
        faults.plugin(fail_epoch=2)
