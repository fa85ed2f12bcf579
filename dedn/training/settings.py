"""`TrainSettings`: how a run is distributed, checkpointed and tracked (what is not the model config).

Read by the driver (`dedn.training.driver.train`), its preflight and the jobs, trials and
analyses that start runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from dedn.errors import ConfigError

__all__ = ["TrainSettings"]


@dataclass(frozen=True)
class TrainSettings:
    """How a run is distributed, checkpointed and tracked (not part of the model config)."""

    num_workers: int = 2
    use_gpu: bool = False
    # with use_gpu: the share of one GPU each worker asks Ray for (0 = a whole GPU); a fraction packs
    # several workers (a sweep's trials) onto one GPU
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.0  # 0 = fit the cluster: min(1, CPUs / workers) without a GPU
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    num_to_keep: int = 2  # checkpoints kept (best val H; the latest is always kept)
    storage_path: str = ""  # Ray Train storage; "" = <DEDN_HOME>/ray_results
    name: str = ""  # Ray Train run name; "" = <model>-<dataset>-<time>-<id> (a new run)
    experiment: str = ""  # MLflow experiment; "" = dedn-<dataset>
    register: bool = True  # register the final model (needs protocol two_phase or final)
    track: bool = True  # MLflow on; False = no run, no registry
    parent_run_id: str = ""  # nest the MLflow run under this run (ablations, comparisons)
    tags: Mapping[str, str] = field(default_factory=dict)  # extra MLflow tags of the run
    # validation T/U/S/H of a selection made elsewhere (a sweep's best trial), for a protocol-final run:
    # the registered version carries them as val_* tags, so it competes for `champion` like any run
    selection_val: Mapping[str, float] | None = None
    verbose: bool = True  # rank-0 progress lines on stdout
    ray_info_logs: bool = False  # Ray Train's own INFO logs (one line per report and rank)
    # training callbacks loaded in every worker, {"module:callable": {options}} (dedn.training.callbacks;
    # DEDN_TRAIN_PLUGINS adds more)
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, v, lo in (("num_workers", self.num_workers, 1), ("max_failures", self.max_failures, 0),
                           ("num_to_keep", self.num_to_keep, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"settings.{key}", f"an int >= {lo}", v, "TrainSettings")
        if self.cpus_per_worker < 0:
            raise ConfigError("settings.cpus_per_worker", ">= 0", self.cpus_per_worker, "TrainSettings")
        if not 0 <= self.gpus_per_worker <= 1:
            raise ConfigError("settings.gpus_per_worker", "a share of one GPU in [0, 1] (a worker trains on one device)",
                              self.gpus_per_worker, "TrainSettings")
        if self.gpus_per_worker > 0 and not self.use_gpu:
            raise ConfigError("settings.gpus_per_worker", "0 unless use_gpu is set", self.gpus_per_worker,
                              "TrainSettings")

    @property
    def gpu_share(self) -> float:
        """The GPUs each worker asks Ray for: 0 without use_gpu, else gpus_per_worker or a whole one."""
        return (self.gpus_per_worker or 1.0) if self.use_gpu else 0.0
