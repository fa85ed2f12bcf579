"""Runs whose storage is an object store: `--storage-path s3://bucket/prefix` against an S3-compatible
server on loopback (moto's server mode, `s3_server` in conftest.py; no real S3 is reachable from CI).

The endpoint, credentials and region come from the standard AWS variables, set for this module
(the module's Ray starts after them, so its workers inherit them, as a job's workers get them
from `jobs/runtime_env.py`). Checked: a wrong bucket or endpoint is one ConfigError naming the URI
before Ray starts; a 2-worker run keeps its checkpoints and records in the bucket, survives a
worker failure by resuming from the bucket's checkpoint, and a second start with the same name
continues the same MLflow run; a deterministic error is recorded in the bucket and reaches the
user as itself.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


OVERRIDES = ["epochs=2", "optim.lr=0.001", "eval.batch_size=64", "optim.max_steps_per_epoch=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory: pytest.TempPathFactory):
    """The loopback S3's AWS_* and a private DEDN_HOME, set for the module (its Ray inherits them)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**s3_server.env, "DEDN_HOME": str(tmp_path_factory.mktemp("s3-home"))}.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield s3_server


def _settings(storage: str, name: str, **kw):
    from dedn.training.driver import TrainSettings

    return TrainSettings(num_workers=2, storage_path=storage, name=name, verbose=False, register=False, **kw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where,reason", [("bucket", "the bucket does not exist"), ("endpoint", "no S3 endpoint answers")])
def test_a_wrong_bucket_or_endpoint_is_one_error_naming_the_uri_before_ray(s3, tiny_dataset, monkeypatch, where,
                                                                           reason):
    import ray

    from dedn.config import build_config
    from dedn.errors import ConfigError
    from dedn.training.driver import train

    uri = f"s3://{s3.bucket}/runs"
    if where == "bucket":
        uri = "s3://no-such-bucket/runs"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    assert not ray.is_initialized()  # nothing may start it before this error
    cfg = build_config("cub", OVERRIDES + [f"data.path={tiny_dataset.root}"])
    with pytest.raises(ConfigError) as e:
        train(cfg, _settings(uri, "wrong"))
    assert str(e.value).startswith("preflight: settings.storage_path:") and uri in str(e.value), e.value
    assert reason in str(e.value)
    assert not ray.is_initialized()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_checkpoints_and_records_live_in_the_bucket_and_the_same_name_resumes_from_there(s3, tiny_dataset, tmp_path):
    """Epoch 2 meets a non-finite loss (a deterministic error: recorded in the bucket, raised as itself,
    epoch 1's checkpoint kept there); the same name again resumes from that checkpoint into the same
    MLflow run and finishes, each epoch logged once, nothing of the run on the local disk."""
    import json

    from faults import plugin

    from dedn import tracking
    from dedn.config import build_config
    from dedn.errors import NonFiniteLossError
    from dedn.storage import read_text as storage_text
    from dedn.training.driver import RUN_RECORD_FILE, STATE_FILE, train
    from dedn.training.fatal import FATAL_FILE

    cfg = build_config("cub", OVERRIDES + [f"data.path={tiny_dataset.root}"])
    storage = f"s3://{s3.bucket}/runs"
    marker = tmp_path / "nan-marker"
    with pytest.raises(NonFiniteLossError):
        train(cfg, _settings(storage, "s3run", max_failures=1,
                             plugins=plugin(fail_rank=0, fail_epoch=2, fail_marker=str(marker), fail_kind="nan")))
    assert marker.exists(), "the fault was not injected"
    keys = s3.keys("runs/s3run/")
    assert {FATAL_FILE, RUN_RECORD_FILE, f"select-epoch0001/{STATE_FILE}"} <= keys, sorted(keys)
    first = json.loads(storage_text(f"{storage}/s3run/{RUN_RECORD_FILE}"))["run_id"]
    c = tracking.client()
    assert c.get_run(first).info.status == "FAILED"

    out = train(cfg, _settings(storage, "s3run"))
    assert out.run_id == first and c.get_run(first).info.status == "FINISHED"
    assert out.storage_dir == f"{storage}/s3run" and out.checkpoint_dir.startswith(f"{storage}/s3run/final-epoch")
    assert out.val_metrics and out.test_metrics and out.best_epoch >= 1
    keys = s3.keys("runs/s3run/")
    assert FATAL_FILE not in keys and f"final-epoch{out.best_epoch:04d}/{STATE_FILE}" in keys, sorted(keys)
    assert [m.step for m in c.get_metric_history(first, "val/H")] == [1, 2]  # epoch 2 redone, logged once
    assert c.get_run(first).data.tags[tracking.CHECKPOINT_TAG] == out.checkpoint_dir
    assert not (Path(os.environ["DEDN_HOME"]) / "ray_results" / "s3run").exists()  # nothing of it on local disk
