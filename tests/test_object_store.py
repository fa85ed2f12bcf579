"""Runs whose storage is an object store: `--storage-path s3://bucket/prefix` against an S3-compatible
server on loopback (moto's server mode, `s3_server` in conftest.py; no real S3 is reachable from CI).

The endpoint, credentials and region come from the standard AWS variables, set for this module
(the session's Ray is started again after them, so its workers inherit them, as a job's workers
get them from `jobs/runtime_env.py`, and stopped after the module; marker `restarts_ray`: the module
runs after every other test that uses the session's Ray, so none needs it started again). Checked: a
wrong bucket or endpoint is one ConfigError naming the URI
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


# the `s3` fixture restarts the session's Ray with the AWS variables: these run after the other Ray tests
pytestmark = pytest.mark.restarts_ray

OVERRIDES = ["epochs=2", "optim.lr=0.001", "eval.batch_size=64", "optim.max_steps_per_epoch=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(s3_server, tmp_path_factory: pytest.TempPathFactory):
    """The loopback S3's AWS_* and a private DEDN_HOME, set for the module; the session's Ray is
    stopped, so that the module's Ray tests start it again with them (a module fixture is set up
    before the per-test one that starts Ray), and stopped after the module, so no later test's
    Ray has them."""
    from conftest import _stop_ray

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**s3_server.env, "DEDN_HOME": str(tmp_path_factory.mktemp("s3-home"))}.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        _stop_ray()
        yield s3_server
    _stop_ray()


def _upload(s3, root: Path, prefix: str) -> str:
    from dedn.data.remote import upload

    uri = f"s3://{s3.bucket}/{prefix}"
    upload(Path(root), uri)
    return uri


def test_a_dataset_on_the_store_is_staged_once_per_node_verified_and_named_when_wrong(s3, tiny_dataset, tmp_path,
                                                                                      monkeypatch):
    """`FeatureDataset.open("s3://...")` copies the dataset to $DEDN_HOME/data-cache, every file's sha256
    checked on the way, and opens the copy; a second open copies nothing; a damaged object, a missing
    dataset or bucket is one DatasetError naming the URI."""
    import boto3
    import numpy as np

    from dedn.data import FeatureDataset, remote
    from dedn.errors import DatasetError

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "node-a"))
    uri = _upload(s3, tiny_dataset.root, "data/tiny")
    assert "dataset.json" in s3.keys("data/tiny/")
    ds = FeatureDataset.open(uri)
    assert ds.root.parent == tmp_path / "node-a" / "data-cache"
    assert ds.name == tiny_dataset.name and ds.feature_shape == tiny_dataset.feature_shape
    assert {k: v.num_rows for k, v in ds.splits.items()} == {k: v.num_rows for k, v in tiny_dataset.splits.items()}
    assert np.array_equal(ds.class_side.attributes, tiny_dataset.class_side.attributes)
    for shard in ds.split("trainval").shards:
        assert ds.shard_path(shard).read_bytes() == tiny_dataset.shard_path(shard).read_bytes()

    def no_copy(*a, **k):
        raise AssertionError("copied again")

    with monkeypatch.context() as mp:
        mp.setattr(remote, "_copy", no_copy)
        assert FeatureDataset.open(uri).root == ds.root

    # another node (no copy yet) meets a shard damaged in the store: named, nothing staged
    shard = ds.split("train").shards[0].file
    client = boto3.client("s3", endpoint_url=s3.env["AWS_ENDPOINT_URL"], region_name=s3.env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"])
    client.put_object(Bucket=s3.bucket, Key=f"data/tiny/{shard}", Body=b"not the shard")
    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "node-b"))
    with pytest.raises(DatasetError) as e:
        FeatureDataset.open(uri)
    assert str(e.value).startswith(f"{uri}/{shard}: sha256: expected ")
    assert not [p for p in (tmp_path / "node-b" / "data-cache").iterdir() if p.is_dir()]
    with pytest.raises(DatasetError, match=f"s3://{s3.bucket}/nothing/dataset.json: file: .*no such object"):
        FeatureDataset.open(f"s3://{s3.bucket}/nothing")
    with pytest.raises(DatasetError, match="s3://no-such-bucket/x/dataset.json: file: "):
        FeatureDataset.open("s3://no-such-bucket/x")


def test_prepare_data_writes_a_dataset_straight_to_the_store(s3, tmp_path, monkeypatch, capsys):
    from toydata import load_job

    from dedn.data import FeatureDataset

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    prepare = load_job("prepare_data").main
    uri = f"s3://{s3.bucket}/data/synth"
    argv = ["synthetic", "--name", "CUB", "--out", uri, "--channels", "8", "--height", "2", "--width", "2",
            "--images-per-class", "2", "--no-progress"]
    assert prepare(argv) == 0
    assert f"uploaded to {uri} (dataset.json last)" in capsys.readouterr().out
    assert FeatureDataset.open(uri).feature_shape == (8, 2, 2)
    assert not any((tmp_path / "home" / "staging").iterdir())  # the local build is gone once uploaded
    assert prepare(argv) == 2
    assert f"{uri}: root: expected a location without a dataset yet (or --overwrite)" in capsys.readouterr().err
    assert prepare([*argv[:4], "s3://no-such-bucket/synth", *argv[5:]]) == 2
    assert "the bucket does not exist" in capsys.readouterr().err


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


def test_a_refused_endpoint_is_named_at_once_without_an_s3_request(monkeypatch):
    """pyarrow's client retries a refused connection for about 6 s; the preflight connects once first."""
    from dedn import storage
    from dedn.errors import ConfigError

    port = _free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    tried = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: tried.append(address) or real(address, *a, **k))
    monkeypatch.setattr(storage, "filesystem", lambda where: pytest.fail(f"an S3 request was made for {where}"))
    with pytest.raises(ConfigError, match=r"settings.storage_path: .*s3://bucket/runs: no S3 endpoint answers"):
        storage.check_writable("s3://bucket/runs", "settings.storage_path")
    assert tried == [("127.0.0.1", port)]


@pytest.mark.timeout(120)
def test_wrong_credentials_are_one_error_naming_the_uri_before_ray(tiny_dataset, monkeypatch):
    """Against an S3 that checks keys (moto with IAM): the right key works; an unknown key or a wrong secret
    stops a run in its preflight, and a dataset read, with one line naming the URI and the variable."""
    import ray
    from conftest import moto_s3

    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.data.remote import upload
    from dedn.errors import ConfigError, DatasetError
    from dedn.storage import check_writable
    from dedn.training.driver import train

    cfg = build_config("cub", OVERRIDES + [f"data.path={tiny_dataset.root}"])
    with moto_s3(check_credentials=True) as s3:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        uri, data = f"s3://{s3.bucket}/runs", f"s3://{s3.bucket}/data"
        check_writable(uri, "settings.storage_path")  # the right key and secret
        upload(tiny_dataset.root, data)
        for var, value, reason in (
                ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000", "the access key is not known to the store (AWS_ACCESS_KEY_ID)"),
                ("AWS_SECRET_ACCESS_KEY", "not-the-secret", "the secret key does not match the access key "
                                                            "(AWS_SECRET_ACCESS_KEY)")):
            with monkeypatch.context() as mp:
                mp.setenv(var, value)
                with pytest.raises(ConfigError) as e:
                    train(cfg, _settings(uri, "creds"))
                assert str(e.value) == (f"preflight: settings.storage_path: expected an object-store location this "
                                        f"machine can write, found '{uri}: {reason}'")
                with pytest.raises(DatasetError) as e:
                    FeatureDataset.open(data)
                assert str(e.value).startswith(f"{data}/dataset.json: file: expected a dataset directory the object "
                                               "store lets this node read, found ")
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

    data = _upload(s3, tiny_dataset.root, "data/tiny-run")  # the data on the store too: staged on the node
    cfg = build_config("cub", OVERRIDES + [f"data.path={data}"])
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
    assert c.get_run(first).data.tags["data_path"] == data
    cache = Path(os.environ["DEDN_HOME"]) / "data-cache"
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # one verified copy on this node, for every process


def test_every_entry_point_hands_an_object_store_dataset_on_as_its_uri(s3, tiny_dataset, tmp_path, monkeypatch,
                                                                      capsys):
    """`--data s3://...` reaches the dataset reader unchanged from every job that takes it and from a sweep
    (a path-style resolve turns `s3://b/x` into `s3:/b/x`, a local path that does not exist); the error
    comes before Ray starts. A dataset opened from the store remembers its URI for other nodes."""
    import importlib.util

    from toydata import ROOT, load_job

    from dedn.config import build_config
    from dedn.data import FeatureDataset
    from dedn.errors import DatasetError
    from dedn.tuning import SweepSpec, load_search_space, run_sweep

    monkeypatch.setenv("DEDN_HOME", str(tmp_path / "home"))
    missing = f"s3://{s3.bucket}/nothing"
    spec = importlib.util.spec_from_file_location("tune_job", ROOT / "tuning" / "tune.py")
    tune_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune_job)  # type: ignore[union-attr]
    mains = {"train": load_job("train").main, "ablate": load_job("ablate").main, "compare": load_job("compare").main,
             "reproduce": load_job("reproduce").main, "tune": tune_job.main}
    for job, main in mains.items():
        assert main(["--data", missing]) == 2, job
        err = capsys.readouterr().err
        assert f"{missing}/dataset.json: file: " in err and "no such object" in err, (job, err)
    with pytest.raises(DatasetError, match=f"^{missing}/dataset.json: file: "):
        run_sweep(SweepSpec(data=missing, base=build_config("cub", []), space=load_search_space(None)))
    uri = _upload(s3, tiny_dataset.root, "data/located")
    ds = FeatureDataset.open(uri)
    assert ds.location == uri and ds.root.is_relative_to(tmp_path / "home" / "data-cache")
    assert FeatureDataset.open(ds.root).location == str(ds.root)


def test_each_rank_reads_a_resumed_object_store_checkpoint_from_a_copy_of_its_own(tmp_path, monkeypatch):
    """Ray's `as_directory` fetches a remote checkpoint into one folder per node and checkpoint, which
    a rank coming after the first download fetches again, over the file another rank is reading (the
    resume test above once failed so under load). `_resume_state` reads a private copy instead."""
    import pyarrow.fs
    import ray.train

    from dedn.checkpoint import save_checkpoint
    from dedn.training import driver

    save_checkpoint(tmp_path / "bucket" / "run" / "ckpt" / driver.STATE_FILE, {"epoch": 3})
    # not Ray's LocalFileSystem: to Ray this is a remote store, fetched as from a bucket
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    ckpt = ray.train.Checkpoint("run/ckpt", filesystem=fs)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ckpt)
    read: list[Path] = []
    real = driver.load_checkpoint
    monkeypatch.setattr(driver, "load_checkpoint", lambda p: read.append(Path(p)) or real(p))
    assert driver._resume_state() == {"epoch": 3} and driver._resume_state() == {"epoch": 3}  # two ranks
    shared = Path(ckpt._get_temporary_checkpoint_dir())
    assert len(read) == 2 and read[0].parent != read[1].parent, read
    assert not any(p.is_relative_to(shared) for p in read), (read, shared)
    assert not any(p.exists() for p in read)  # each copy removed after reading
