"""One decoded copy of a split per node, shared by every worker and every concurrent trial there.

A sweep of four trials on one node would otherwise decode the same split four times and hold it
four times (CUB's training split: 1.4 GB of float16 each). Instead one actor per node
(`NodeSplitCache`, no CPU) decodes a split the first time a worker asks for it and `ray.put`s
the arrays into the node's object store; workers `ray.get` them, which for numpy arrays is a
read-only, zero-copy view of the shared memory (docs/stack-notes.md). Concurrent first requests
wait for the one decode (a lock per split).

Lifetime: the actors belong to the driver that calls `start_node_caches` (a training job, or the
sweep's driver before any trial starts) and die with it; the objects they put die with them.
Their names carry the Ray job id, so two jobs on one cluster never share, or kill, each other's
copy. A worker on a node without an actor (a node that joined later; a run without Ray) decodes
for itself and says so. Ray is imported where it is used: the driver imports this module, and
importing the driver does not load Ray. torch too: the actor's process imports this module and
decodes into numpy (`decode_split_arrays`), so it never loads torch (measured, decoding
a toy split: 0.75 CPU-s and 186 MB of memory per actor, against 1.8 CPU-s and 374 MB
with torch); only the workers' views are tensors.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any

from dedn.data.dataset import FeatureDataset
from dedn.data.reader import DecodedSplit, ResidentSplit, decode_split_arrays
from dedn.errors import DednError

__all__ = ["NAMESPACE", "actor_name", "start_node_caches", "node_split_loader", "split_key"]

NAMESPACE = "dedn"
_held: list[Any] = []  # this driver's handles: the actors live as long as the driver holds them


def actor_name(job_id: str, node_id: str) -> str:
    return f"dedn-split-cache-{job_id}-{node_id}"


def split_key(dataset: FeatureDataset, split: str) -> str:
    """The dataset directory, the split and its shards' checksums: a rewritten dataset is a new key."""
    shards = ",".join(s.sha256 for s in dataset.split(split).shards)
    return f"{dataset.root}|{split}|{shards}"


class NodeSplitCache:
    """Decodes each split once and keeps it in this node's object store (see the module docstring)."""

    def __init__(self) -> None:
        self._refs: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.decodes: list[str] = []
        self.served: dict[str, int] = {}  # requests answered per split key (what a worker read from here)

    def get(self, root: str, split: str, key: str) -> dict[str, Any]:
        """{"ref": [ObjectRef of the arrays]} or {"error": the DednError decoding raised}."""
        import ray  # on use (module docstring)

        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._refs:
                try:
                    res = decode_split_arrays(FeatureDataset.open(root, verify="none"), split)  # no torch here
                except DednError as e:  # the user's error, whole, to the worker that asked
                    return {"error": e}
                self._refs[key] = ray.put({"split": split, "features": res.features, "labels": res.labels,
                                           "sample_ids": res.sample_ids})
                self.decodes.append(key)
            self.served[key] = self.served.get(key, 0) + 1
        return {"ref": [self._refs[key]]}  # in a list: returned as a reference, not fetched by the caller

    def stats(self) -> dict[str, Any]:
        return {"decodes": list(self.decodes), "held": list(self._refs), "served": dict(self.served)}


def start_node_caches() -> list[Any]:
    """Create (or find) this job's cache actor on every alive node; call from the driver, after init_ray."""
    import ray  # on use (module docstring)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    job = ray.get_runtime_context().get_job_id()
    remote = ray.remote(num_cpus=0, max_concurrency=16)(NodeSplitCache)
    actors = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        actors.append(remote.options(
            name=actor_name(job, node["NodeID"]), namespace=NAMESPACE, get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote())
    _held.extend(actors)
    return actors


def _view(arrays: dict[str, Any]) -> ResidentSplit:
    with warnings.catch_warnings():  # zero-copy views of the object store are read-only; the reader only reads
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return ResidentSplit.from_arrays(arrays["split"], DecodedSplit(arrays["features"], arrays["labels"],
                                                                       arrays["sample_ids"]), shared=True)


def node_split_loader(announce: Any = None) -> Any:
    """A `ResidentData` loader: the node's shared copy under Ray, a local decode where there is none."""

    def load(dataset: FeatureDataset, split: str) -> ResidentSplit:
        import ray  # on use (module docstring)

        try:
            ctx = ray.get_runtime_context()
            actor = ray.get_actor(actor_name(ctx.get_job_id(), ctx.get_node_id()), namespace=NAMESPACE)
        except (ValueError, RuntimeError):  # no cache actor for this job on this node
            from dedn.data.resident import decode_split  # in the worker (module docstring)

            if announce is not None:
                announce(f"data: no node-shared copy on this node; {split} decoded by this worker")
            return decode_split(dataset, split)
        got = ray.get(actor.get.remote(str(dataset.root), split, split_key(dataset, split)))
        if "error" in got:
            raise got["error"]
        return _view(ray.get(got["ref"][0]))

    return load
