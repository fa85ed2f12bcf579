"""User errors stop in the driver before Ray or MLflow start; the record of a deterministic error
inside a worker round-trips as itself (issue 12, items 1 and 2; such an error ending a job once, not
retried: tests/test_found_early.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dedn.config import build_config
from dedn.errors import ConfigError, DatasetError
from dedn.training.driver import TrainSettings, train
from dedn.training.fatal import FATAL_FILE
from dedn.training.preflight import preflight

QUICK = ["epochs=1", "optim.max_steps_per_epoch=2", "eval.batch_size=64"]


def _cfg(ds_root: Path, *over: str):
    return build_config("cub", QUICK + [f"data.path={ds_root}", *over])


def _settings(tmp_path: Path, **kw) -> TrainSettings:
    return TrainSettings(num_workers=1, track=False, register=False, verbose=False,
                         storage_path=str(kw.pop("storage", tmp_path / "ray")), **kw)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The driver must stop before it asks for Ray: `init_ray` is replaced by a recorder (the session's
    Ray may be up already, so `ray.is_initialized()` cannot tell)."""
    from dedn.training import driver

    asked: list[str] = []
    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: asked.append("init_ray"))
    return asked


@pytest.mark.parametrize("override,key", [
    ("model.num_clusters=1000", "model.num_clusters"),  # k-means asked for more clusters than attributes
    ("dataset=SUN", "dataset"),                          # the config names another dataset than the directory
])
def test_config_errors_stop_before_ray_starts(tiny_dataset, tmp_path, override, key, no_ray):
    over = [override] + (["model.clusters=kmeans"] if "num_clusters" in override else [])
    with pytest.raises(ConfigError, match=key):
        train(_cfg(tiny_dataset.root, *over), _settings(tmp_path))
    assert no_ray == []


def test_unwritable_storage_is_named(tiny_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"settings.storage_path: expected a writable folder"):
        preflight(_cfg(tiny_dataset.root), _settings(tmp_path, storage=blocker / "ray"))


def test_manifest_class_sets_that_disagree_with_the_shards_fail_in_the_driver(tiny_dataset, tmp_path, no_ray):
    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset.root, root)
    m = json.loads((root / "dataset.json").read_text())
    moved = m["unseen_classes"][0]  # one unseen class declared seen: test_unseen's labels no longer agree
    m["unseen_classes"] = m["unseen_classes"][1:]
    m["seen_classes"] = sorted(m["seen_classes"] + [moved])
    (root / "dataset.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=rf"test_unseen-00000.parquet: label: expected classes of unseen_classes "
                                           rf"\(split test_unseen, dataset.json\), found other classes \[{moved}\]"):
        train(_cfg(root), _settings(tmp_path))
    assert no_ray == []


def test_a_dataset_without_manual_clusters_runs_on_kmeans_with_a_warning(tmp_path):
    from dedn.families.dedn.config import DEDNModelConfig
    from toydata import write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy")
    m = json.loads((root / "dataset.json").read_text())
    m["name"], m["clusters"] = "MYDATA", {}  # a dataset of one's own: no manual attribute clusters
    (root / "dataset.json").write_text(json.dumps(m))
    cfg = build_config(None, {"dataset": "MYDATA", "data.path": str(root)})
    assert cfg.model.clusters == DEDNModelConfig().clusters == "manual"
    with pytest.warns(UserWarning, match="model.clusters: MYDATA has no manual attribute clusters; using k-means"):
        resolved, _, _ = preflight(cfg, _settings(tmp_path))
    assert resolved.model.clusters == "kmeans"


def test_the_fatal_record_round_trips_and_a_failed_preflight_touches_nothing(tiny_dataset, tmp_path):
    """The recorded error comes back as its own class and message; a run that fails its preflight
    leaves the run folder as it was."""
    from dedn.training.fatal import read_fatal, write_fatal

    fatal = tmp_path / "ray" / "again" / FATAL_FILE
    write_fatal(fatal, DatasetError("x.parquet", "sha256", "abc", "def"))
    again = read_fatal(fatal)
    assert type(again) is DatasetError and str(again) == "x.parquet: sha256: expected abc, found def"
    with pytest.raises(ConfigError, match="model.num_clusters"):  # the preflight fails before the run folder is touched
        train(_cfg(tiny_dataset.root, "model.clusters=kmeans", "model.num_clusters=1000"),
              _settings(tmp_path, name="again"))
    assert fatal.is_file()  # preflight failed first: nothing of the old run was touched


def test_bf16_gradient_compression_on_cpu_workers_stops_before_ray_starts(tiny_dataset, tmp_path, no_ray):
    """torch refuses the bf16 hook on gloo; the driver says so in seconds, naming the key and the way out."""
    with pytest.raises(ConfigError, match="train.ddp_comm_hook.*fp16"):
        train(_cfg(tiny_dataset.root, "train.ddp_comm_hook=bf16"),
              TrainSettings(num_workers=2, track=False, register=False, verbose=False, storage_path=str(tmp_path)))
    assert no_ray == []
