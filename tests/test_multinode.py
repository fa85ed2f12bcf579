"""Multi-node, for real, on one machine: a 3-node Ray cluster trains, loses a node, and sweeps.

`ray.cluster_utils.Cluster` starts a head and two worker nodes, each a raylet with its own object
store and 1 CPU, plus a custom resource naming it (`node0`..`node2`), so the tests can tell nodes
apart in Ray's own terms. Every node shares this machine's filesystem: the "shared filesystem"
option of docs/cluster.md (data, checkpoints and the MLflow store at the same paths everywhere).
The tests' driver is this process, joined to the cluster as a user's `python jobs/train.py
--address ...` would be (dedn's `init_ray` finds Ray up and uses it).

1. 3 workers, 1 CPU each, so one per node: each node decodes each split once into its object
   store (3 decodes of the training split, one per node, each read by its node's worker), system
   metrics arrive per node, the ranks' shares are disjoint and cover the split, and the ranks end
   with identical parameters.
2. The same run again, with a worker node removed in the middle of selection epoch 2 (its rank
   holds after the epoch's first step until the node is gone): Ray Train restarts the group once a
   new node has joined, from epoch 1's checkpoint, and the run ends on the first run's exact
   numbers, in one MLflow run with every epoch logged once. Worker counts are fixed (DDP's
   learning-rate rule and the per-rank shares depend on them): the restart waits for the cluster
   to place all 3 workers again rather than carrying on with 2.
3. A 4-trial sweep on the cluster (issue 25): every trial reads the split from its own node's copy
   (the cache actors answered 4 requests) and no node decodes a split twice. Which node takes
   which trial is Ray's placement (at least two nodes carry trials at 0.5 CPU each).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import HEALTH_CHECK, _stop_ray

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]

TESTS = Path(__file__).resolve().parent
EPOCHS = 3
OVERRIDES = [f"epochs={EPOCHS}", "optim.lr=0.001", "eval.batch_size=64", "data.resident=host"]
NODE_ENV = {  # the cluster's processes inherit this process's environment
    "RAY_USAGE_STATS_ENABLED": "0",
    **HEALTH_CHECK,  # a dead worker is seen within a second
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",  # a restart waits for the replacement node
    "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # a short run still samples every node
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory):
    """The cluster, a DEDN_HOME of its own, tests/ on its workers' path (the faults plugin).

    This process leaves the session's Ray first, as test_object_store's `s3` does: module fixtures are
    made before the per-test one that would (`_one_ray`), and a `ray` test run just before (another
    file's, in a selection or a second process) leaves it up."""
    from ray.cluster_utils import Cluster

    _stop_ray()

    home = tmp_path_factory.mktemp("multinode-home")
    env = {**NODE_ENV, "DEDN_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node0": 1}})
        try:
            for i in (1, 2):
                cluster.add_node(num_cpus=1, resources={f"node{i}": 1})
            cluster.wait_for_nodes()
            yield cluster
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()


@pytest.fixture
def joined(three_nodes):
    """This process as the cluster's driver (the `own_cluster` marker disconnects it before each test;
    the node-cache actors belong to the connection and go with it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=three_nodes.address, log_to_driver=False)
    return three_nodes


def _train(root: Path, name: str, record: Path, **faults):
    from faults import plugin

    from dedn.config import build_config
    from dedn.training.driver import TrainSettings, train

    cfg = build_config("cub", OVERRIDES + [f"data.path={root}"])
    settings = TrainSettings(num_workers=3, cpus_per_worker=1.0, name=name, max_failures=1, verbose=False,
                             register=False, plugins=plugin(record_dir=str(record), **faults))
    return train(cfg, settings)


def _ranks(record: Path) -> list[dict]:
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(3)]


def _node_names() -> dict[str, str]:
    """Ray node id -> the custom resource that names it (node0..), alive nodes only."""
    import ray

    return {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("node") and k[4:].isdigit())
            for n in ray.nodes() if n["Alive"]}


def _cache_stats() -> dict[str, dict]:
    """This driver's node-cache actors' stats, by node name."""
    import ray

    from dedn.training.node_cache import NAMESPACE, actor_name

    job = ray.get_runtime_context().get_job_id()
    out = {}
    for node_id, name in _node_names().items():
        try:
            actor = ray.get_actor(actor_name(job, node_id), namespace=NAMESPACE)
        except ValueError:  # a node that joined after the run started has none
            continue
        out[name] = ray.get(actor.stats.remote())
    return out


@pytest.fixture(scope="module")
def spread(three_nodes, tiny_dataset, tmp_path_factory):
    """The uninterrupted 3-node run and what its caches did (kept for the node-loss test)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=three_nodes.address, log_to_driver=False)
    record = tmp_path_factory.mktemp("spread-record")
    out = _train(Path(tiny_dataset.root), "spread", record)
    return out, record, _cache_stats(), _node_names()


@pytest.mark.timeout(300)
def test_three_workers_on_three_nodes_share_one_copy_per_node_and_agree(joined, spread, tiny_dataset):
    from faults import feature_digest

    from dedn import tracking
    from dedn.data.reader import ShardReader
    from dedn.training.node_cache import split_key

    out, record, caches, names = spread
    ranks = _ranks(record)
    assert sorted(names[r["node"]] for r in ranks) == ["node0", "node1", "node2"], "one worker per node"
    assert len({r["params"] for r in ranks}) == 1, "ranks ended with different parameters"

    # one decoded copy per node and split, read by that node's worker
    assert sorted(caches) == ["node0", "node1", "node2"]
    for split in ("train", "val_seen", "val_unseen", "trainval"):
        key = split_key(tiny_dataset, split)
        assert [c["decodes"].count(key) for c in caches.values()] == [1, 1, 1], split
    assert [c["served"][split_key(tiny_dataset, "train")] for c in caches.values()] == [1, 1, 1]

    # the per-rank shares: disjoint, and together the split less at most world_size - 1 rows
    for phase, split, epochs in (("select", "train", EPOCHS), ("final", "trainval", out.best_epoch)):
        want: list[str] = []
        for b in ShardReader(tiny_dataset, split, batch_size=512, shuffle=False):
            want += feature_digest(b.features)
        for e in map(str, range(1, epochs + 1)):
            seen = [set(r["seen"][phase][e]) for r in ranks]
            assert sum(map(len, seen)) == len(set().union(*seen)), f"{phase} epoch {e}: ranks overlap"
            assert set().union(*seen) <= set(want)
            assert len(want) - len(set().union(*seen)) <= 2 and len({len(s) for s in seen}) == 1

    # system metrics: one sampler per node, each under its own name
    metrics = tracking.client().get_run(out.run_id).data.metrics
    sampled = {k.split("/")[1] for k in metrics if k.startswith("system/") and k.endswith("cpu_utilization_percentage")}
    assert sampled == {"node0", "node1", "node2"}, sorted(k for k in metrics if k.startswith("system/"))


@pytest.mark.timeout(600)
def test_a_node_removed_mid_epoch_resumes_on_a_new_node_to_the_same_result(joined, spread, tiny_dataset,
                                                                             tmp_path: Path):
    from dedn import tracking

    base, base_record, _, _ = spread
    cluster = joined
    names = _node_names()
    victim = next(n for n in cluster.worker_nodes if names[n.node_id] == "node1")
    name = names[victim.node_id]
    marker = tmp_path / "hold-marker"
    record = tmp_path / "record"
    # the run in a thread: Ray starts a node from the main thread only (it installs signal handlers)
    pool = ThreadPoolExecutor(1)
    try:
        run = pool.submit(_train, Path(tiny_dataset.root), "node-loss", record, fail_kind="hold", fail_epoch=2,
                          fail_node=victim.node_id, fail_marker=str(marker))
        deadline = time.monotonic() + 300
        while not marker.exists() and not run.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the run never reached the hold in selection epoch 2"
        cluster.remove_node(victim)  # its raylet, object store and worker go at once
        time.sleep(3)  # the group fails and cannot be placed on the two nodes left
        assert not run.done()
        cluster.add_node(num_cpus=1, resources={name: 1})
        out = run.result(timeout=400)
    finally:
        pool.shutdown(wait=False)  # a failed assertion above: the module's teardown ends the run
    ranks = _ranks(record)
    assert victim.node_id not in {r["node"] for r in ranks}  # the restarted group runs on the new node
    assert sorted(_node_names()[r["node"]] for r in ranks) == ["node0", "node1", "node2"]

    # exactly the uninterrupted run's result (CPU, gloo, resumed from epoch 1's checkpoint)
    assert out.val_metrics == base.val_metrics and out.test_metrics == base.test_metrics
    assert out.best_epoch == base.best_epoch and out.weights == base.weights
    assert ranks[0]["params"] == _ranks(base_record)[0]["params"]
    # one MLflow run, each epoch logged once
    c = tracking.client()
    runs = c.search_runs([out.experiment_id], filter_string="tags.mlflow.runName = 'node-loss'")
    assert [r.info.run_id for r in runs] == [out.run_id] and runs[0].info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(out.run_id, "val/H")] == list(range(1, EPOCHS + 1))
    assert [m.step for m in c.get_metric_history(out.run_id, "final/loss")] == list(range(1, out.best_epoch + 1))


@pytest.mark.timeout(600)
def test_a_sweep_on_three_nodes_reads_each_nodes_one_copy(joined, awa2_tiny: Path, tmp_path: Path):
    import shutil

    from conftest import sweep_at_once

    from dedn.data import FeatureDataset
    from dedn.training.node_cache import split_key

    data = tmp_path / "awa2"  # a copy of its own: a new dataset key, decoded afresh on each node
    shutil.copytree(awa2_tiny, data)
    summary = sweep_at_once(data, "multinode-sweep", tmp_path, trials=4)
    assert summary.num_trials == 4, summary

    caches = _cache_stats()
    key = split_key(FeatureDataset.open(data, verify="none"), "train")
    decodes = {n: c["decodes"].count(key) for n, c in caches.items()}
    served = {n: c["served"].get(key, 0) for n, c in caches.items()}
    assert set(decodes.values()) <= {0, 1}, decodes  # never twice on one node
    assert sum(served.values()) == 4, served  # every trial read its node's copy
    assert sum(decodes.values()) >= 2, decodes  # trials on at least two nodes
