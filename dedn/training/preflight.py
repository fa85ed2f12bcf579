"""Before a run: the driver's preflight, in seconds, before Ray or an MLflow run starts.

`preflight` checks everything a user can get wrong (the dataset and its labels, the family's
dataset-dependent defaults, one build of the network, writable locations, room for
checkpoints); `check_cluster_resources`, once Ray is up, that the cluster can place the workers.
"""
from __future__ import annotations

import shutil
from typing import Mapping

from dedn.config import RunConfig
from dedn.data import FeatureDataset
from dedn.errors import ConfigError
from dedn.families import family_of
from dedn.home import dedn_home
from dedn.protocol import SELECTION_SPLITS
from dedn.storage import check_writable, local_path, resolve
from dedn.tracking.location import tracking_uri
from dedn.training.callbacks import plugin_specs
from dedn.training.loop import build_model
from dedn.training.settings import TrainSettings

__all__ = ["open_dataset", "preflight", "check_cluster_resources", "cluster_summary", "trial_resource_problem"]


def open_dataset(cfg: RunConfig) -> tuple[RunConfig, FeatureDataset]:
    """The run's dataset, checked in the driver; a selection-only run never opens a test shard."""
    if not cfg.data.path:
        raise ConfigError("data.path", "a dataset directory", "", "config")
    data = resolve(cfg.data.path)  # an absolute path, or an object-store URI as it is
    splits = SELECTION_SPLITS if cfg.protocol == "select" else None
    dataset = FeatureDataset.open(data, splits=splits)
    if dataset.name.upper() != cfg.dataset.upper():
        raise ConfigError("dataset", f"the dataset's name {dataset.name!r} (from {data}/dataset.json)", cfg.dataset, "config")
    family_of(cfg)  # an unknown model.name fails here, before Ray starts
    return cfg.replace(**{"data.path": data}), dataset


def preflight(cfg: RunConfig, settings: TrainSettings) -> tuple[RunConfig, FeatureDataset, str]:
    """Everything a user can get wrong, checked in the driver in seconds, before Ray or MLflow start.

    The dataset (manifest, shard footers, the label columns against the manifest's class sets),
    the family's dataset-dependent defaults (`ModelFamily.resolve`), the network built once
    (clusters, sizes: every check the family makes at build time), the training plugins (each name
imports), and the checkpoint location:
    writable (an object store: reachable with these credentials), with room for the checkpoints kept
    (a local disk). Returns the resolved config, the dataset and the Ray Train storage location (an
    absolute path or a URI, `dedn.storage`).
    """
    cfg, dataset = open_dataset(cfg)
    plugin_specs(settings.plugins, check=True)  # every training plugin imports here, as in the workers
    if cfg.train.ddp_comm_hook == "bf16" and not settings.use_gpu and settings.num_workers > 1:
        raise ConfigError("train.ddp_comm_hook", "none or fp16 on CPU workers (gloo): bf16 compression needs NCCL, "
                          "i.e. --use-gpu", "bf16", "preflight")
    cfg = family_of(cfg).resolve(cfg, dataset.class_side)
    model = build_model(cfg, dataset.class_side, dataset.feature_shape)
    storage = resolve(settings.storage_path) if settings.storage_path else str(dedn_home() / "ray_results")
    check_writable(storage, "settings.storage_path" if settings.storage_path else "DEDN_HOME")
    if settings.track and tracking_uri().startswith("sqlite:"):
        check_writable(str(dedn_home()), "DEDN_HOME")
    # a checkpoint holds the weights, the optimiser state (RMSprop: about as much again, with momentum
    # twice) and the best epoch's weights: 4x the weights is a safe bound; num_to_keep + 1 are on disk
    # while the newest is written (an object store has no free-space figure to check)
    need = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) * (settings.num_to_keep + 1)
    free = shutil.disk_usage(storage).free if local_path(storage) else need
    if free < need:
        raise ConfigError("settings.storage_path", f"{need / 2**20:.0f} MiB free for {settings.num_to_keep + 1} checkpoints",
                          f"{free / 2**20:.0f} MiB free at {storage}", "preflight")
    return cfg, dataset, storage


def cluster_summary(have: Mapping[str, float], nodes: int) -> str:
    """What a cluster has, for messages: "2 CPUs and 0 GPUs on 1 node(s)"."""
    return f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs on {nodes} node(s)"


def trial_resource_problem(have: Mapping[str, float], nodes: int, cpus: float, gpus: float) -> str | None:
    """Why a cluster with `have` (ray.cluster_resources()) can never run one trial of `cpus` CPUs and `gpus`
    GPUs, or None. Tune would otherwise keep every trial PENDING for ever."""
    short = [f"{need:g} {kind}s" for kind, need in (("CPU", cpus), ("GPU", gpus))
             if need > 0 and have.get(kind, 0) + 1e-9 < need]
    if not short:
        return None
    return f"one trial needs {' and '.join(short)}; the cluster has {cluster_summary(have, nodes)}"


def check_cluster_resources(settings: TrainSettings, cpus_per_worker: float) -> None:
    """ConfigError in seconds when the cluster can never place the workers (after init_ray).

    Without it, Ray Train waits for resources forever (asking for GPUs on a CPU-only cluster hangs
    with an autoscaler message every ~35 s). Counts what the cluster has now; an autoscaling
    cluster that would add GPU nodes on demand needs them started first.
    """
    import ray  # Ray is up by now; importing this module does not load it (the driver's rule)

    have = ray.cluster_resources()
    summary = cluster_summary(have, sum(1 for n in ray.nodes() if n.get("Alive")))
    gpus = settings.num_workers * settings.gpu_share
    if settings.use_gpu and have.get("GPU", 0) + 1e-9 < gpus:
        share = "one per worker" if settings.gpu_share == 1 else f"{settings.gpu_share:g} of one per worker"
        raise ConfigError("--use-gpu", f"a cluster with {gpus:g} GPU(s), {share}",
                          f"{summary} (drop --use-gpu to train on CPUs)", "preflight")
    need = settings.num_workers * cpus_per_worker
    if need > have.get("CPU", 0) + 1e-9:
        raise ConfigError("--num-workers/--cpus-per-worker",
                          f"{settings.num_workers} x {cpus_per_worker:g} = {need:g} CPUs the cluster can place",
                          summary, "preflight")

