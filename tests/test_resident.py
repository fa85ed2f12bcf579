"""data.resident's choice per split (budget, modes), the bf16 fallback, the lr scaling rule."""
from __future__ import annotations

import warnings

import pytest
import torch

from dedn.accel import autocast_dtype_for, fast_bf16
from dedn.config import OptimConfig, build_config
from dedn.data import FeatureDataset
from dedn.data.resident import ResidentData, split_nbytes
from dedn.errors import ConfigError
from test_dataset import write_dataset


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> FeatureDataset:
    root = tmp_path_factory.mktemp("resident") / "ds"
    write_dataset(root)
    return FeatureDataset.open(root)


def _decodes(ds):
    calls = []

    def load(d, split):
        from dedn.data.resident import decode_split

        calls.append(split)
        return decode_split(d, split)
    return calls, load


def test_auto_is_resident_within_the_budget_and_streams_past_it(ds):
    train, val = split_nbytes(ds, "train"), split_nbytes(ds, "val_seen")
    assert train == ds.split("train").num_rows * ds.feature_size * 2  # float16 storage
    calls, load = _decodes(ds)
    lines: list[str] = []
    # a budget (in MiB) the training split fits but not training + validation: bytes scaled up by 2**20
    budget_bytes = train + val - 1
    rd = ResidentData(ds, "auto", 1, "cpu", load=load, announce=lines.append)
    rd.budget = budget_bytes
    assert rd.get("train") is not None and rd.get("val_seen") is None
    assert rd.get("train") is rd.get("train") and calls == ["train"]  # decoded once, kept
    assert rd.held_bytes == train
    assert [c.where for c in rd.choices] == ["host", "stream"]
    assert "resident in host memory" in lines[0] and "exceed data.resident_budget_mib" in lines[1]


@pytest.mark.parametrize("mode,expect", [("off", "stream"), ("host", "host"), ("device", "host")])
def test_explicit_modes(ds, mode, expect):
    rd = ResidentData(ds, mode, 0, "cpu")  # a zero budget binds only auto
    got = rd.get("train")
    assert (got is None) == (expect == "stream") and rd.choices[0].where == expect


def test_bad_mode_names_the_key(ds):
    with pytest.raises(ConfigError, match="data.resident"):
        ResidentData(ds, "gpu", 1, "cpu")
    with pytest.raises(ConfigError, match="data.resident"):
        build_config("cub", ["data.resident=gpu"])


def test_bf16_without_native_support_falls_back_to_fp32_with_a_warning(monkeypatch):
    import dedn.accel as accel

    monkeypatch.setattr(accel, "cpu_flags", lambda: frozenset({"avx2"}))
    ok, why = fast_bf16("cpu")
    assert not ok and "avx512_bf16" in why
    with pytest.warns(RuntimeWarning, match="training in fp32 instead"):
        assert autocast_dtype_for("bf16", "cpu") is None
    monkeypatch.setattr(accel, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast_dtype_for("bf16", "cpu") is torch.bfloat16
        assert autocast_dtype_for("auto", "cpu") is None  # CPU runs stay fp32 unless asked
        assert autocast_dtype_for("fp32", "cpu") is None


@pytest.mark.parametrize("rule,factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_rule(rule, factor):
    o = OptimConfig(lr=1e-4, lr_scaling=rule)
    assert o.scaled_lr(o.lr, 4) == pytest.approx(1e-4 * factor)
    assert o.scaled_lr(o.lr, 1) == pytest.approx(1e-4)
