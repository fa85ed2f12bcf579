"""Ray Train (V2) DDP training of DEDN on 2 CPU workers: data partition, rank agreement, MLflow, fault recovery.

One uninterrupted run (module fixture) serves five tests; the fault test runs the same
configuration again: the disk fills up while epoch 2's checkpoint is written (the run ends with
that message), then the same name continues it and rank 1 raises once in the middle of selection
epoch 2 (Ray restarts the group). It must end bitwise identical to the uninterrupted run (CPU,
gloo: every operation is deterministic and the checkpoint holds model, optimiser, history and RNG
state).

Faults and the per-rank records come from the test-side training plugin `tests/faults.py`
(`TrainSettings.plugins`, or DEDN_TRAIN_PLUGINS for jobs/train.py): this folder is on the
PYTHONPATH the Ray workers inherit.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # 2-worker runs, faults, resumes

EPOCHS = 3
OVERRIDES = [f"epochs={EPOCHS}", "optim.lr=0.001", "eval.batch_size=64"]


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory: pytest.TempPathFactory, ray_session):
    """A private DEDN_HOME on the session's Ray (its workers find the faults plugin, tests/faults.py)."""
    home = tmp_path_factory.mktemp("dedn_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEDN_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield home


def _run(tiny_dataset, home: Path, name: str, overrides: tuple[str, ...] = (), **faults):
    from faults import plugin

    from dedn.config import build_config
    from dedn.training.driver import TrainSettings, train

    cfg = build_config("cub", OVERRIDES + [f"data.path={tiny_dataset.root}", *overrides])
    record = home / f"record-{name}"
    settings = TrainSettings(num_workers=2, name=name, max_failures=1, verbose=False, register=name == "baseline",
                             plugins=plugin(record_dir=str(record), **faults))
    ours = signal.getsignal(signal.SIGINT)
    out = train(cfg, settings)
    assert signal.getsignal(signal.SIGINT) is ours  # not Ray Train's, which fit() leaves behind (tests/test_crash.py)
    return out, record


@pytest.fixture(scope="module")
def baseline(ray_env, tiny_dataset):
    return _run(tiny_dataset, ray_env, "baseline")


def _split_digests(ds, split: str) -> set[str]:
    from faults import feature_digest
    from dedn.data.reader import ShardReader

    out: list[str] = []
    for b in ShardReader(ds, split, batch_size=512, shuffle=False):
        out += feature_digest(b.features)
    assert len(out) == len(set(out)), "the tiny dataset has duplicate feature rows; digests cannot identify samples"
    return set(out)


def _ranks(record: Path) -> list[dict]:
    return [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(180)
def test_each_sample_once_per_epoch_across_workers(baseline, tiny_dataset):
    out, record = baseline
    r0, r1 = _ranks(record)
    for phase, split, epochs in (("select", "train", EPOCHS), ("final", "trainval", out.best_epoch)):
        want = _split_digests(tiny_dataset, split)
        assert sorted(r0["seen"][phase]) == [str(e) for e in range(1, epochs + 1)]
        for e in map(str, range(1, epochs + 1)):
            a, b = r0["seen"][phase][e], r1["seen"][phase][e]
            assert len(a) == len(set(a)) and len(b) == len(set(b)), "a rank saw a sample twice in one epoch"
            assert not set(a) & set(b), "ranks overlap"
            assert set(a) | set(b) <= want
            # equal_rows: each rank takes N // 2 rows, so at most world_size - 1 = 1 row is skipped
            assert len(a) == len(b) == len(want) // 2
            assert len(want) - len(set(a) | set(b)) <= 1


@pytest.mark.timeout(60)
def test_a_run_without_ray_datasets_starts_no_dataset_manager(baseline):
    """Ray Train 2.60 would start a DatasetManager actor for every run (dedn.training.driver._trainer_class)."""
    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    ours = list_actors(filters=[("job_id", "=", job)], limit=10_000, raise_on_missing_output=False)
    names = {a.class_name for a in ours}
    assert "TrainController" in names and "RayTrainWorker" in names, names  # the listing sees this driver's runs
    assert "DatasetManager" not in names, names


@pytest.mark.timeout(180)
def test_ranks_end_with_identical_parameters(baseline):
    _, record = baseline
    r0, r1 = _ranks(record)
    assert r0["params"] == r1["params"]


@pytest.mark.timeout(180)
def test_metrics_logged_once_per_epoch_and_model_registered(baseline):
    from dedn import tracking

    out, _ = baseline
    c = tracking.client()
    run = c.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "CUB" and run.data.tags["semi_synthetic"] == "true"
    assert run.data.params["optim.epochs"] == str(EPOCHS) and run.data.params["loss.beta"] == "0.001"
    # MLflow keys: one UI section per prefix (tracking.metric_key)
    for key in ("train/loss", "val/H", "val/T", "val/lambda_rc", "perf/images_per_s", "perf/epoch_time_s", "train/mal_c",
                "train/distill"):
        steps = [m.step for m in c.get_metric_history(out.run_id, key)]
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    final_steps = [m.step for m in c.get_metric_history(out.run_id, "final/loss")]
    assert final_steps == list(range(1, out.best_epoch + 1))
    assert len(c.get_metric_history(out.run_id, "test/H")) == 1
    assert not [k for k in run.data.metrics if "/" not in k]  # every metric in a section
    arts = {a.path for a in c.list_artifacts(out.run_id)}
    assert {"config.yaml", "final_metrics.json", "per_class_accuracy.csv", "training_curves.png"} <= arts
    assert out.registered is not None and out.registered.champion
    mv = c.get_model_version_by_alias("dedn-cub", "champion")
    assert str(mv.version) == out.registered.version and mv.run_id == out.run_id
    assert float(mv.tags["test_H"]) == pytest.approx(out.test_metrics["H"], abs=1e-6)
    # the experiment's artifacts live under DEDN_HOME, not in a working directory
    exp = c.get_experiment(out.experiment_id)
    assert exp.artifact_location.startswith((tracking.dedn_home() / "mlartifacts").as_uri())


@pytest.mark.timeout(240)
def test_msdn_trains_through_the_same_job_and_registers_under_its_own_name(ray_env, tiny_dataset):
    import numpy as np
    import torch

    from dedn import tracking
    from dedn.config import build_config
    from dedn.data.reader import ShardReader
    from dedn.tracking.registry import load_predictor
    from dedn.training import loop as engine
    from dedn.training.driver import TrainSettings, train

    cfg = build_config("cub", ["model=msdn", "epochs=2", "optim.lr=0.001", "optim.max_steps_per_epoch=3",
                               "eval.batch_size=64", f"data.path={tiny_dataset.root}"])
    assert cfg.model.name == "msdn" and cfg.loss.distance == "cubic"  # families/msdn/presets/cub.yaml, not DEDN's
    out = train(cfg, TrainSettings(num_workers=2, name="msdn", verbose=False, max_failures=0))
    run = tracking.client().get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "msdn"
    assert run.data.params["model.name"] == "msdn" and "train/ce_av" in run.data.metrics and "val/w1" in run.data.metrics
    assert out.registered is not None and out.registered.name == "msdn-cub" and out.registered.champion
    # the registered MSDN scores like the network rebuilt from the run's final checkpoint
    pred = load_predictor("models:/msdn-cub@champion")
    assert type(pred.model).__name__ == "MSDN"
    x = next(iter(ShardReader(tiny_dataset, "test_unseen", batch_size=5, shuffle=False))).features
    state = torch.load(Path(out.checkpoint_dir) / "state.pt", map_location="cpu", weights_only=True)
    net = engine.build_model(pred.cfg, tiny_dataset.class_side, tiny_dataset.feature_shape)
    net.load_state_dict(state["model"])
    with torch.no_grad():
        want = net.eval()(x).inference_scores(pred.cfg.eval.w1).numpy()
    np.testing.assert_allclose(pred.scores(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
def test_full_disk_then_a_worker_failure_each_resume_to_the_uninterrupted_result_in_one_run(baseline, ray_env,
                                                                                           tiny_dataset):
    """Issue 12, items 6 and 7: the write of epoch 2's checkpoint fails part-way (a file-size limit in
    the worker, as a full disk would). The run ends at once with CheckpointWriteError, no retry, no
    half-written checkpoint, its MLflow run FAILED. The same name then continues the same MLflow run
    from epoch 1's checkpoint; in it rank 1 raises once in the middle of selection epoch 2, Ray Train
    restarts the worker group from that checkpoint, and the run still ends bitwise equal to the
    uninterrupted one, each epoch logged once.

    Both attempts stream from Parquet (data.resident=off) where the baseline held its splits resident
    (data.resident=auto): the readers make the same batches, so the result must match exactly. Until
    2026-12-06 the worker failure was a run of its own (a 2-worker run more); a restart from a
    checkpoint the same fit() wrote is the D3GZSL test's and the node-removal test's."""
    from dedn import tracking
    from dedn.checkpoint import CheckpointWriteError, load_checkpoint
    from dedn.training.driver import RUN_RECORD_FILE, STATE_FILE

    base, base_record = baseline
    streamed = ("data.resident=off",)
    disk, raised = ray_env / "disk-marker", ray_env / "fault-marker"
    with pytest.raises(CheckpointWriteError, match=r"disk-full/select-epoch0002/state.pt: checkpoint: could not be "
                                                   r"written \(File too large, errno 27\); the partial copy was removed"):
        _run(tiny_dataset, ray_env, "disk-full", streamed, fail_rank=0, fail_epoch=2, fail_marker=str(disk),
             fail_kind="disk_full")
    run_dir = ray_env / "ray_results" / "disk-full"
    assert disk.exists() and not (run_dir / "select-epoch0002").exists()
    assert not [p for p in run_dir.rglob("*") if ".partial" in p.name], "a partial checkpoint was left"
    for state in run_dir.rglob(STATE_FILE):  # what is there under a checkpoint's name loads
        load_checkpoint(state)
    run_id = json.loads((run_dir / RUN_RECORD_FILE).read_text())["run_id"]
    c = tracking.client()
    assert c.get_run(run_id).info.status == "FAILED"

    assert not raised.exists()
    out, record = _run(tiny_dataset, ray_env, "disk-full", streamed, fail_rank=1, fail_epoch=2, fail_marker=str(raised))
    assert raised.exists(), "the worker failure was not injected"
    assert out.run_id == run_id and c.get_run(run_id).info.status == "FINISHED"
    assert c.get_run(run_id).data.metrics["perf/data_resident_mib"] == 0
    assert c.get_run(base.run_id).data.metrics["perf/data_resident_mib"] > 0
    # Tolerance: exact. Same seed on CPU/gloo; both resumes start from the epoch-1 checkpoint.
    assert out.val_metrics == base.val_metrics and out.test_metrics == base.test_metrics
    assert out.best_epoch == base.best_epoch and out.weights == base.weights
    assert _ranks(record)[0]["params"] == _ranks(base_record)[0]["params"]
    # neither the epoch the disk cut short nor the one the failure redid is logged twice
    assert [m.step for m in c.get_metric_history(run_id, "val/H")] == list(range(1, EPOCHS + 1))
    assert len(c.search_runs([c.get_run(run_id).info.experiment_id], "tags.mlflow.runName = 'disk-full'")) == 1


D3_EPOCHS = 2  # the fault comes in selection epoch 2, the last
D3_ARGS = ["model=d3gzsl", f"epochs={D3_EPOCHS}", "model.hidden=32", "model.embed_dim=16", "optim.batch_size=32",
           "loss.teacher_epochs=2", "loss.n_critic=2", "eval.syn_per_class=4", "eval.classifier_epochs=2",
           "eval.batch_size=64", "d3.w_od=0.01"]


@pytest.mark.timeout(300)
def test_d3gzsl_through_jobs_train_ddp_ranks_agree_and_a_worker_failure_resumes_exactly(ray_env, tiny_dataset):
    """D3GZSL on 2 workers through jobs/train.py: each of G, D, the student and the sigmoid is in its own
    DDP wrapper (ranks read different rows, so equal parameters at the end mean every network's
    gradients were all-reduced); every loss part is logged; the model registers as d3gzsl-cub; and
    rank 1 failing in selection epoch 2 then resuming ends bitwise equal to the uninterrupted run."""
    import faults
    from toydata import load_job

    from dedn import tracking
    from dedn.training.callbacks import PLUGINS_ENV

    main = load_job("train").main
    c = tracking.client()

    def run(name: str, **options):
        record = ray_env / f"record-{name}"
        argv = ["--data", str(tiny_dataset.root), "--preset", "cub", "--num-workers", "2", "--max-failures", "1",
                "--name", name, *D3_ARGS]
        # the job has no fault parameter: the plugin comes from the driver's environment, as for the soak
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(PLUGINS_ENV, faults.env(record_dir=str(record), **options)[PLUGINS_ENV])
            assert main(argv) == 0
        (found,) = c.search_runs([c.get_experiment_by_name("dedn-cub").experiment_id], f"tags.ray_train_run = '{name}'")
        return found, _ranks(record)

    base, base_ranks = run("d3-base")
    assert base.info.status == "FINISHED" and base.data.tags["model"] == "d3gzsl"
    assert base_ranks[0]["params"] == base_ranks[1]["params"]
    for key in [f"train/{k}" for k in ("loss", "critic", "gp", "wasserstein", "generator", "d3_cls", "d3_kl", "d3_be",
                                       "d3_od", "g_d3_od")] + ["val/H"]:
        assert [m.step for m in c.get_metric_history(base.info.run_id, key)] == list(range(1, D3_EPOCHS + 1)), key
    mv = c.get_model_version_by_alias("d3gzsl-cub", "champion")
    assert mv.run_id == base.info.run_id

    marker = ray_env / "d3-fault-marker"
    faulty, faulty_ranks = run("d3-faulty", fail_rank=1, fail_epoch=2, fail_marker=str(marker))
    assert marker.exists(), "the fault was not injected"
    assert faulty_ranks[0]["params"] == base_ranks[0]["params"]
    for key in ("val/H", "train/d3_od", "train/generator", "test/H"):
        assert ([m.value for m in c.get_metric_history(faulty.info.run_id, key)]
                == [m.value for m in c.get_metric_history(base.info.run_id, key)]), key


@pytest.mark.timeout(120)
def test_node_shared_copy_is_decoded_once_for_two_processes(ray_env, tiny_dataset):
    """Two worker processes on the node get the split from its cache actor: one decode, read-only
    zero-copy views of the object store, equal to a decode of their own."""
    import numpy as np
    import ray

    from dedn.data import FeatureDataset
    from dedn.data.resident import decode_split
    from dedn.training.node_cache import actor_name, NAMESPACE, split_key, start_node_caches

    start_node_caches()

    @ray.remote(num_cpus=0)
    class Reader:
        def read(self, root: str, split: str):
            from dedn.training.node_cache import node_split_loader

            res = node_split_loader()(FeatureDataset.open(root), split)
            writeable = res.sample_ids.flags.writeable or res.labels.flags.writeable  # numpy straight from Ray
            return os.getpid(), res.shared, writeable, res.sample_ids, res.labels, res.features.float().numpy()

    # Big enough (400 x 64x2x2 float16 = 200 KiB) for the object store; Ray copies objects under 100 KiB inline.
    from dedn.data import SPLITS, DatasetWriter, split_classes
    from test_dataset import make_class_side

    cs, rng = make_class_side(), np.random.default_rng(0)
    with DatasetWriter(ray_env / "shared-ds", class_side=cs, feature_shape=(64, 2, 2)) as w:
        for split in SPLITS:
            n = 400 if split == "val_unseen" else 2
            with w.split(split) as sp:
                sp.add(1000 * SPLITS.index(split) + np.arange(n), rng.choice(split_classes(cs, split), n), rng.standard_normal((n, 64, 2, 2)))
    ds = FeatureDataset.open(ray_env / "shared-ds")
    readers = [Reader.remote(), Reader.remote()]
    got = ray.get([r.read.remote(str(ds.root), "val_unseen") for r in readers])
    own = decode_split(ds, "val_unseen")
    assert got[0][0] != got[1][0]  # two processes
    for _, shared, writeable, ids, labels, feats in got:
        assert shared and not writeable  # a view of the object store, not a private copy
        assert np.array_equal(ids, own.sample_ids) and np.array_equal(labels, own.labels)
        assert np.array_equal(feats, own.features.float().numpy())
    ctx = ray.get_runtime_context()
    cache = ray.get_actor(actor_name(ctx.get_job_id(), ctx.get_node_id()), namespace=NAMESPACE)
    assert ray.get(cache.stats.remote())["decodes"].count(split_key(ds, "val_unseen")) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kw,key", [(dict(use_gpu=True), "--use-gpu"), (dict(cpus_per_worker=2.0), "--num-workers")])
def test_workers_the_cluster_can_never_place_fail_in_seconds(ray_env, tiny_dataset, kw, key):
    """--use-gpu on this CPU-only Ray (or 2 x 2 CPUs on 2) ends at once, saying what the cluster has."""
    import time

    from dedn.config import build_config
    from dedn.errors import ConfigError
    from dedn.training.driver import TrainSettings, train

    cfg = build_config("cub", OVERRIDES + [f"data.path={tiny_dataset.root}"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=key) as e:
        train(cfg, TrainSettings(num_workers=2, track=False, register=False, verbose=False, **kw))
    assert time.perf_counter() - t0 < 30
    assert "2 CPUs and 0 GPUs on 1 node(s)" in str(e.value)
