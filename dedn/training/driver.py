"""The one training driver: a Ray Train function run by a `TorchTrainer`, for every job and trial.

(The worker function and the driver share the loop config, the checkpoint folder and its record
files; kept in one module so both sides of that contract read together.)

`train(cfg, settings)` (driver side) opens the dataset, creates the MLflow run, starts a
TorchTrainer whose workers run `train_func` — the one train function: `jobs/train.py`, the
ablations, the comparison, every Tune trial (one worker or N) and a sweep's final retrain all
come through here, as in Ray's own Train/Tune interop examples. A trial passes a callback
that relays its reports to Tune (`dedn.tuning.trial`); a run of protocol `select` never opens
a test shard.

`train_func` (every worker): the dataset streamed by rank (`ShardReader(rank, world_size)`),
DDP over gloo (CPU) or NCCL (GPU, bf16 autocast), evaluation counts summed over ranks, and
`dedn.training.loop.run_protocol` with its sinks: console progress (rank 0), MLflow (rank 0,
`dedn.tracking.MLflowSink`) and Ray Train (`RayTrainSink`: every rank reports, rank 0 writes
the checkpoint). After a worker failure Ray restarts the group (`FailureConfig`) and the loop
continues from `ray.train.get_checkpoint()`; the checkpoint carries model, optimisers, history,
best-so-far, RNG state and, in the final phase, the selection.

Training callbacks (`dedn.training.callbacks`): plugins named in `TrainSettings.plugins` or
`DEDN_TRAIN_PLUGINS` are loaded in every worker and see its start, each phase's training module,
every epoch, rank 0's checkpoint writes and the trained network (the fault tests inject faults so).

Ray is imported where a function needs it, so that importing this module (tuning, the analyses,
tests) does not load Ray Train (about 1.5 s); MLflow's registry likewise, which only the driver
uses after a run (the Ray Train workers import this module too).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import posixpath
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import pyarrow.fs
import torch
import torch.distributed as dist
from torch import nn

from dedn import storage, tracking
from dedn.accel import autocast_dtype_for
from dedn.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from dedn.config import RunConfig
from dedn.data import FeatureDataset
from dedn.data.reader import ShardReader, forbid_splits
from dedn.errors import ConfigError, DednError, OutputError, os_reason
from dedn.families import family_of
from dedn.families.capabilities import training_module
from dedn.protocol import TEST_SPLITS
from dedn.tracking.sink import MLflowSink
from dedn.training.ddp import TorchCollective, ddp
from dedn.training.callbacks import CallbackList, WorkerContext, load_callbacks, plugin_specs
from dedn.training.fatal import FATAL_FILE, read_fatal, write_fatal
from dedn.training.loop import model_from_state, run_protocol
from dedn.training.node_cache import node_split_loader, start_node_caches
from dedn.training.preflight import check_cluster_resources, open_dataset, preflight
from dedn.training.ray_cluster import init_ray, set_continue_hint
from dedn.training.report import SCORE_ATTRIBUTE, ConsoleSink, EpochReport, StateFn, say
from dedn.training.settings import TrainSettings

# TrainSettings: dedn.training.settings's, named here too (where every job imports it from)
__all__ = [
    "STATE_FILE", "SCORE_ATTRIBUTE", "TrainSettings", "TrainOutcome", "init_ray", "cpus_per_worker", "train_func",
    "build_trainer", "train", "read_outcome", "open_dataset", "last_model",
]

STATE_FILE = "state.pt"  # the loop's checkpoint dict (torch.save of tensors and plain values)


@dataclass
class TrainOutcome:
    """What `train` hands back: where things went, the selection, the test metrics, the registered version."""

    run_id: str | None
    experiment_id: str | None
    tracking_uri: str | None
    storage_dir: str
    checkpoint_dir: str | None
    val_metrics: dict[str, float] | None
    test_metrics: dict[str, float] | None
    best_epoch: int
    weights: dict[str, float]  # the selected (or configured) inference weights
    history: list[EpochReport] = field(default_factory=list)  # the last phase's epochs
    registered: Any = None  # dedn.tracking.registry.RegisteredVersion
    seconds: float = 0.0


# ---- Ray -------------------------------------------------------------------------------------
def cpus_per_worker(num_workers: int, use_gpu: bool, requested: float = 0.0, available: float | None = None) -> float:
    """CPUs each worker asks Ray for: `requested`, else what fits `available` (default: the cluster's).

    On a 2-CPU machine 2 workers get 1 CPU each (Train V2's controller needs none); fractional
    values keep small clusters schedulable.
    """
    if requested > 0:
        return float(requested)
    if available is None:
        import ray  # on use (module docstring)

        available = float(ray.cluster_resources().get("CPU", 1.0))
    per = available / num_workers
    # CPU training: one core each is what a worker uses well; GPU workers get a few for the reader
    return max(0.25, min(per, 4.0 if use_gpu else 1.0))


def torch_threads(cpus: float) -> int:
    """Intra-op threads of a worker: its whole CPUs, at least one (more would oversubscribe the node)."""
    return max(1, int(math.floor(cpus)))


# ---- the worker --------------------------------------------------------------------------------
class RayTrainSink:
    """Every rank calls ray.train.report with the epoch's metrics; rank 0 attaches the checkpoint.

    Rank 0 persists it itself (`persist`, Ray's checkpoint_upload_fn): on local or shared-disk
    storage the files are copied to a temporary folder beside the checkpoint's and renamed into
    place, so a full disk leaves no half-written checkpoint under a real name, only a clear
    CheckpointWriteError.
    """

    def __init__(self, rank: int, around_write: Callable[[EpochReport], ContextManager[None]] | None = None):
        self.rank = rank
        self.around_write = around_write or (lambda report: nullcontext())

    def on_epoch(self, report: EpochReport, state: StateFn) -> None:
        import ray.train  # on use (module docstring)

        metrics = report.metrics()
        # final-phase epochs have no validation: NaN ranks them below every selection epoch
        # (Ray keeps the latest checkpoint whatever its score)
        metrics.setdefault(SCORE_ATTRIBUTE, float("nan"))
        metrics.update(phase=report.phase, epoch=int(report.epoch))
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                try:
                    save_checkpoint(Path(d) / STATE_FILE, state())
                except OutputError as e:
                    raise CheckpointWriteError(e.path, e.reason) from None
                except RuntimeError as e:  # torch.save reports a failed write as RuntimeError
                    raise CheckpointWriteError(Path(d) / STATE_FILE, os_reason(e)) from None
                checkpoint = ray.train.Checkpoint.from_directory(d)
            upload = functools.partial(self.persist, report=report) if checkpoint is not None else None
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"{report.phase}-epoch{report.epoch:04d}",
                             checkpoint_upload_fn=upload)

    def persist(self, checkpoint: Any, dir_name: str, report: EpochReport) -> Any:
        """Copy the checkpoint folder into the run's storage under `dir_name`, whole or not at all."""
        import ray.train  # on use (module docstring)

        where = ray.train.get_context().get_storage()
        fs = where.storage_filesystem
        if not isinstance(fs, pyarrow.fs.LocalFileSystem):  # an object store writes each object whole
            return where.persist_current_checkpoint(checkpoint, dir_name)
        final = Path(where.build_checkpoint_path_from_name(dir_name))
        tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
        try:
            with self.around_write(report):  # the callbacks' (a test's full disk)
                shutil.rmtree(tmp, ignore_errors=True)
                _copy_folder(Path(checkpoint.path), tmp)
            if final.exists():  # a resumed run reports the epoch it was in again
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(final / STATE_FILE, os_reason(e)) from None
        return ray.train.Checkpoint(path=str(final), filesystem=fs)


def _copy_folder(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder file by file (an OSError names its own errno, unlike shutil.copytree's)."""
    dst.mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            shutil.copyfile(path, target)


def _quiet_ray_train_reports(keep: bool) -> None:
    """Ray Train V2 logs every `report` (metrics dict included) at INFO on every rank, on a logger named
    after its module file, which LoggingConfig does not reach; the progress lines replace it."""
    if keep:
        return
    try:
        from ray.train.v2._internal.execution import context as train_context  # on use (module docstring)
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class _DropTrainingErrorLog(logging.Filter):
    """Drops Ray Train's "Error in training function:" log of one error (found by its message)."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Error in training function") and self.message in text)


def _quiet_fatal_error_log(e: BaseException) -> None:
    """A non-retryable DednError reaches the user as one `error:` line from the driver; Ray Train also
    logs it at ERROR in the worker with the whole traceback, once per attempt (each restart re-raises
    it), which would bury that line: that log is dropped for this error alone (and for another rank's
    error that merely followed from it). A retryable error, a bug, keeps Ray's traceback."""
    try:
        from ray.train.v2._internal import util as train_util  # on use (module docstring)
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(train_util.__name__).addFilter(_DropTrainingErrorLog(str(e)))


def _resume_state() -> dict[str, Any] | None:
    """The state of the checkpoint Ray Train resumes from, read by this rank alone.

    A local checkpoint is read in place. An object store's is fetched into a folder of this call's
    own: Ray's `as_directory` gives every rank on a node one shared folder named after the
    checkpoint, and a rank that comes after the first download has finished downloads it again into
    that folder, over the file another rank is reading (a resume from a moto bucket under load failed
    so once: torch.load "failed reading file data/141").
    """
    import ray.train  # on use (module docstring)

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return load_checkpoint(Path(ckpt.path) / STATE_FILE)
    with tempfile.TemporaryDirectory(prefix="dedn-resume-") as d:
        return load_checkpoint(Path(ckpt.to_directory(d)) / STATE_FILE)


def train_func(config: dict[str, Any]) -> None:
    """The one train function (every Ray Train worker of every run): `run_protocol` with DDP and sinks.

    config: {"cfg": run config dict (data.path absolute), "use_gpu", "threads", "run_id",
    "tracking_uri", "semi_synthetic", "plugins": {"module:callable": options} (dedn.training.callbacks),
    "verbose", "ray_info_logs", "fatal_file"}. A deterministic error (a non-retryable DednError: bad
    data, a non-finite loss) is recorded in fatal_file, which stops Ray Train's restarts
    (`_stop_on_recorded_error`); a restart made all the same re-raises it at once instead of training
    again, and the driver raises it to the user as itself.
    """
    import ray.train  # on use (module docstring)
    import ray.train.torch

    _quiet_ray_train_reports(bool(config.get("ray_info_logs")))
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = RunConfig.from_dict(config["cfg"], source="train_loop_config")
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    autocast_dtype = autocast_dtype_for(cfg.train.precision, device)  # bf16 on a GPU with native bf16 (auto)
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    # a selection-only run (a sweep's trial) must not touch a test shard: the guard is per process
    guard = forbid_splits(TEST_SPLITS) if cfg.protocol == "select" else nullcontext()
    fatal = config.get("fatal_file") or None  # a path or an object-store URI
    recorded = read_fatal(fatal) if fatal is not None else None
    if recorded is not None:  # a restart after a deterministic error: it would happen again, end now
        _quiet_fatal_error_log(recorded)
        raise recorded
    try:
        with guard:
            _train_worker(config, cfg, rank, world_size, device, autocast_dtype, distributed)
    except DednError as e:
        # e.g. TrackingStoreError: the tracking store failed (read-only, locked, full, a server gone)
        if not e.retryable:
            _quiet_fatal_error_log(e)
            if fatal is not None:
                try:
                    write_fatal(fatal, e)  # temp name + rename: with several ranks failing, one whole file wins
                except OutputError:  # a full disk: Ray's restart meets the same error again, and ends the same way
                    pass
        raise
    except Exception as e:
        # another rank's deterministic error ended the group (Ray's synchronisation actor, the collectives
        # are gone): the driver raises that one, recorded first
        if fatal is not None and storage.read_text(fatal) is not None:
            _quiet_fatal_error_log(e)
        raise


def _train_worker(config: dict[str, Any], cfg: RunConfig, rank: int, world_size: int, device: torch.device,
                  autocast_dtype: torch.dtype | None, distributed: bool) -> None:
    """train_func's body: the dataset, the callbacks and sinks, then run_protocol under DDP."""
    # The driver verified the dataset; a worker trusts the manifest (each reader checks its own shards).
    dataset = FeatureDataset.open(cfg.data.path, verify="none")
    resume = _resume_state()
    callbacks = CallbackList(load_callbacks(config.get("plugins") or {}))
    phase, epoch = _start_position(cfg, resume)
    callbacks.on_start(WorkerContext(rank, world_size, device, cfg, phase, epoch, resume is not None))
    trained: list[nn.Module] = []  # the network of the phase in training: the trained one at the end

    def wrap_ddp(net: nn.Module) -> nn.Module:
        return ddp(net, cfg, device) if distributed else net

    def wrap(model: nn.Module) -> nn.Module:
        trained[:] = [model]
        # DDP around the network, or around each of a family's networks; then the callbacks'
        return callbacks.wrap_model(training_module(family_of(cfg), model, wrap_ddp))

    sinks: list[Any] = [callbacks] if callbacks else []
    announce = say if rank == 0 and config.get("verbose", True) else None  # what data.resident chose, per split
    if rank == 0 and config.get("verbose", True):
        sinks.append(ConsoleSink(world_size))
    if rank == 0 and config.get("run_id"):
        sinks.append(MLflowSink(config["run_id"], config["tracking_uri"], cfg, dataset,
                                semi_synthetic=bool(config.get("semi_synthetic"))))
    sinks.append(RayTrainSink(rank, callbacks.around_checkpoint_write if callbacks else None))
    with _node_system_metrics(config, distributed):
        run_protocol(cfg, dataset, sinks=sinks, resume=resume, rank=rank, world_size=world_size, device=device,
                     wrap_model=wrap, collective=TorchCollective() if distributed else None,
                     autocast_dtype=autocast_dtype,
                     split_loader=node_split_loader(announce) if cfg.data.resident_shared else None, announce=announce)
    if trained:  # the loop's own network, as trained: nothing rebuilt
        callbacks.on_end(trained[0])


def _start_position(cfg: RunConfig, resume: Mapping[str, Any] | None) -> tuple[str, int]:
    """The phase and epoch a worker trains first: after a checkpoint, the next epoch (after selection's
    last epoch, the final phase's first)."""
    if resume is None:
        return ("final" if cfg.protocol == "final" else "select"), 1
    phase, epoch = str(resume["phase"]), int(resume["epoch"]) + 1
    if phase == "select" and epoch > int(resume.get("epochs", epoch)):
        return "final", 1
    return phase, epoch


def _node_system_metrics(config: Mapping[str, Any], distributed: bool) -> Any:
    """MLflow system metrics of this node into the run, from the node's lowest rank (one sampler per
    node); nodes are told apart (`system/node<k>/...`, k in order of their lowest rank) when the run
    spans several.

    A node is a Ray node (a raylet), found by its id and gathered over the ranks: Ray Train's own
    local rank groups workers by IP, so several raylets on one machine (`ray.cluster_utils.Cluster`,
    a container per node sharing a host network) would be one node to it and sampled once."""
    import ray  # on use (module docstring)

    if not config.get("run_id"):
        return nullcontext()
    here = ray.get_runtime_context().get_node_id()
    nodes = [here]
    if distributed:
        nodes = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, here)
    first = list(dict.fromkeys(nodes))  # node ids in order of their lowest rank
    if nodes.index(here) != (dist.get_rank() if distributed else 0):
        return nullcontext()  # a lower rank on this node samples it
    return tracking.system_metrics(config["run_id"], config.get("tracking_uri"),
                                   node_id=f"node{first.index(here)}" if len(first) > 1 else None)


def last_model(state: Mapping[str, Any], cfg: RunConfig, dataset: FeatureDataset) -> nn.Module:
    """The network of a checkpoint dict (its own config and meta), on CPU."""
    run_cfg = RunConfig.from_dict(state["config"], source="checkpoint") if "config" in state else cfg
    return model_from_state(run_cfg, dataset, state["model"], state.get("meta"))


# ---- the driver ------------------------------------------------------------------------------
@functools.cache
def _trainer_class() -> type:
    """TorchTrainer without Ray Data's per-run `DatasetManager` actor when the run passes no Ray dataset.

    Ray Train 2.60 starts that actor for every run, datasets or not (its `DatasetsCallback`); ours
    read Parquet shards themselves and never pass one, so each run paid a process (about 1.4 CPU-s,
    measured) that did nothing. `_create_default_callbacks` is Ray's private hook; where a future Ray
    lacks it the override is never called and Ray's default stands (tests/test_distributed.py checks
    that no DatasetManager starts).
    """
    from ray.train.torch import TorchTrainer  # on use (module docstring)
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return Trainer


def build_trainer(cfg: RunConfig, settings: TrainSettings, *, run_id: str | None, tracking_uri: str | None,
                  semi_synthetic: bool, storage_path: str, name: str, callbacks: Sequence[Any] = (),
                  fatal_file: str = "") -> Any:
    """The TorchTrainer of one run (Ray must be initialised); callbacks: e.g. a trial's relay of its reports to Tune."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig  # on use
    from ray.train.torch import TorchConfig

    cpus = cpus_per_worker(settings.num_workers, settings.use_gpu, settings.cpus_per_worker)
    resources: dict[str, float] = {"CPU": cpus}
    if settings.use_gpu:
        resources["GPU"] = settings.gpu_share
    loop_config = {
        "cfg": cfg.to_dict(), "use_gpu": settings.use_gpu, "threads": torch_threads(cpus), "run_id": run_id,
        "tracking_uri": tracking_uri, "semi_synthetic": semi_synthetic, "verbose": settings.verbose,
        "plugins": plugin_specs(settings.plugins), "ray_info_logs": settings.ray_info_logs, "fatal_file": fatal_file,
    }
    return _trainer_class()(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=settings.num_to_keep, checkpoint_score_attribute=SCORE_ATTRIBUTE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            # Ray Train logs every report at INFO; our rank-0 progress lines say what matters. Its
            # warnings are transient noise with a traceback each on a loaded node ("Failed to send
            # resource request ... safe to ignore" when its coordinator answers after 5 s): errors only
            logging_config=LoggingConfig(log_level="INFO" if settings.ray_info_logs else "ERROR"),
            callbacks=[*callbacks, _keep_snapshot(storage.join(storage_path, name)),
                       *([_stop_on_recorded_error(fatal_file)] if fatal_file else [])],
        ),
    )


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, in its run folder
SNAPSHOT_COPY = f".{SNAPSHOT_FILE}.whole"  # the last whole copy of it (`_keep_snapshot`)


def _keep_snapshot(run_folder: str) -> Any:
    """A controller callback: after each report round with a checkpoint, a whole copy of Ray Train's
    record of the run's checkpoints. Ray Train 2.60 writes that record in place (truncate, then write:
    `CheckpointManager._write_state_to_storage`), so a driver killed meanwhile (its controller goes with
    it) left it empty, and the same --name could not continue (seen once in CI). The checkpoint manager
    is the first of the controller's report callbacks, so this one sees the round's record written."""
    from ray.train import UserCallback  # on use (module docstring)

    class KeepSnapshot(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if checkpoint is None:
                return
            try:
                text = storage.read_text(storage.join(run_folder, SNAPSHOT_FILE))
                if text is not None:
                    json.loads(text)  # only a whole record is kept
                    storage.write_text(storage.join(run_folder, SNAPSHOT_COPY), text)
            except Exception:  # noqa: BLE001 - no copy this round: the run itself goes on
                pass

    return KeepSnapshot()


def restore_snapshot(run_folder: str) -> str | None:
    """Before a run continues: Ray Train's record of its checkpoints cut short (`_keep_snapshot`) is
    replaced by the last whole copy. Returns what was done, in words (None: nothing to do); without a
    copy, a ConfigError naming the file."""
    path = storage.join(run_folder, SNAPSHOT_FILE)
    text = storage.read_text(path)
    if text is None:
        return None
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    copy = storage.read_text(storage.join(run_folder, SNAPSHOT_COPY))
    if copy is None:
        raise ConfigError("--name", "a run whose record of checkpoints can be read, to continue it",
                          f"{path} is cut short (its driver was stopped while Ray Train wrote it) and has no whole "
                          "copy; use another --name to start afresh", "preflight")
    storage.write_text(path, copy)
    return f"{path} was cut short (its driver was stopped while Ray Train wrote it): restored from its last whole copy"


class _DropLogOf(logging.Filter):
    """Drops the log records that carry one exception (by identity)."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is self.error)


def _stop_on_recorded_error(fatal_file: str) -> Any:
    """A controller callback: a worker group that failed after recording a deterministic error (fatal_file)
    is not restarted. Ray Train retries every worker-group error up to max_failures; each restart starts
    a worker group (seconds on one node, more on a cluster) only for train_func to read the record and
    raise again. A Ray Train DeveloperAPI (ControllerCallback; callbacks that are no UserCallback reach the
    controller as they are): a ControllerError raised before a RETRY is executed is not retryable, so the
    run ends at once and the driver raises the recorded error. If the record cannot be read here, the
    restart happens as before and train_func raises it."""
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2._internal.execution.callback_manager import CallbackManager
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import ControllerError

    class StopOnRecordedError(ControllerCallback):
        def before_controller_execute_failure_decision(self, failure_decision: Any) -> None:
            if failure_decision != FailureDecision.RETRY:
                return
            try:
                recorded = read_fatal(fatal_file)
            except Exception:  # noqa: BLE001 - the store unreadable from the controller: restart, as without us
                return
            if recorded is not None:
                stop = ControllerError(recorded)
                # Ray logs a raising callback with its traceback; the driver's one `error:` line says it
                logging.getLogger(CallbackManager.__module__).addFilter(_DropLogOf(stop))
                raise stop

    return StopOnRecordedError()


def run_name(cfg: RunConfig) -> str:
    return f"{cfg.model.name}-{cfg.dataset.lower()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


RUN_RECORD_FILE = "mlflow_run.json"  # in the run's storage folder: the MLflow run a resumed run continues


def read_outcome(ckpt_dir: str | None, cfg: RunConfig) -> dict[str, Any]:
    """Selection and test metrics from a run's last checkpoint folder (the loop's state dict)."""
    fam = family_of(cfg)
    if ckpt_dir is None:
        return {"val": None, "test": None, "best_epoch": 0, "weights": fam.configured_weights(cfg), "state": None}
    state = load_checkpoint(Path(ckpt_dir) / STATE_FILE)
    history = [EpochReport.from_dict(h) for h in state.get("history", [])]
    sel = state.get("selection") if state["phase"] == "final" else state.get("best")
    test = history[-1].test if state["phase"] == "final" and history else None
    weights = dict(sel["weights"]) if sel else fam.configured_weights(cfg)
    return {"val": sel.get("metrics") if sel else None, "test": test,
            "best_epoch": int(sel["epoch"]) if sel else int(state["epoch"]), "weights": weights, "state": state,
            "history": history}


def _outcome_of(checkpoint: Any, run_folder: str, cfg: RunConfig) -> tuple[str | None, dict[str, Any]]:
    """(where the last checkpoint is, `read_outcome` of it): a local folder is read in place, an
    object store's is fetched into a temporary folder first (Ray's `as_directory`)."""
    if checkpoint is None:
        return None, read_outcome(None, cfg)
    if storage.local_path(run_folder) is not None:
        return checkpoint.path, read_outcome(checkpoint.path, cfg)
    with checkpoint.as_directory() as d:
        return storage.join(run_folder, posixpath.basename(checkpoint.path)), read_outcome(d, cfg)


def _end_failed_run(run: Any, status: str) -> str:
    """Mark the MLflow run of a run that ended with an error `status` (FAILED, KILLED); "" when done.

    When the store fails that too (the store that failed the run, a full disk), the run is left
    RUNNING there: that is recorded under DEDN_HOME (`record_unfinished`) and the next start against
    the store marks it KILLED (its driver is gone by then, as for a killed driver's run). Returns
    what became of the run, in words, for the error the user sees.
    """
    try:
        run.finish(status)
        return ""
    except Exception as store_error:  # noqa: BLE001 - whatever the store says, the run's own error comes first
        left = f"MLflow run {run.run_id} could not be marked {status} ({store_error})"
    try:
        tracking.store.record_unfinished(run.run_id, "KILLED", run.tracking_uri)
    except OutputError as e:  # DEDN_HOME itself cannot be written: only a dead driver's runs are found
        logging.getLogger(__name__).warning("%s; nor recorded (%s)", left, e)
        return f"run {run.run_id} is left RUNNING there"
    logging.getLogger(__name__).warning("%s; the next start against this store marks it", left)
    return f"run {run.run_id} is left RUNNING there until the next start against this store marks it KILLED"


def train(cfg: RunConfig, settings: TrainSettings | None = None, *, callbacks: Sequence[Any] = ()) -> TrainOutcome:
    """Run cfg.protocol on Ray Train (initialising Ray if needed), track it, register the final model.

    cfg.data.path must name a dataset directory. Returns a TrainOutcome; raises what the
    workers raised once `max_failures` restarts are used up.
    """
    settings = settings or TrainSettings()
    t0 = time.perf_counter()
    cfg, dataset, location = preflight(cfg, settings)  # user errors stop here: no Ray, no MLflow run yet
    name = settings.name or run_name(cfg)
    run_folder = storage.join(location, name)  # Ray Train's folder of this run: checkpoints, and our two records
    fatal = storage.join(run_folder, FATAL_FILE)
    storage.remove(fatal)  # a resumed run starts without the error that stopped it before
    restored = restore_snapshot(run_folder)
    if restored:
        print(f"note: {restored}", file=sys.stderr, flush=True)

    run = None
    if settings.track:
        tracking.init_store()  # in the driver, before any worker touches the store
    init_ray()  # before the run's tags: they name the Ray job
    set_continue_hint(f"run again with --name {name} to continue from the last checkpoint")
    # workers the cluster can never place would wait forever: say what it has, before any MLflow run
    check_cluster_resources(settings, cpus_per_worker(settings.num_workers, settings.use_gpu, settings.cpus_per_worker))
    if cfg.data.resident != "off" and cfg.data.resident_shared:
        start_node_caches()  # one decoded copy per node, owned by this driver (a trial finds its sweep's)
    if settings.track:
        # the same --name again continues the checkpoints (Ray Train) and the same MLflow run, whose id
        # is kept beside them: its history stays whole
        record = storage.join(run_folder, RUN_RECORD_FILE)
        text = storage.read_text(record)
        previous = json.loads(text).get("run_id") if text else None
        run = tracking.reopen_run(previous) if previous else None
        if run is None:
            run = tracking.start_training_run(cfg, name=name, semi_synthetic=dataset.semi_synthetic,
                                              experiment=settings.experiment, parent_run_id=settings.parent_run_id,
                                              tags={"num_workers": str(settings.num_workers),
                                                    "device": "gpu" if settings.use_gpu else "cpu", **settings.tags})
            storage.write_text(record, json.dumps({"run_id": run.run_id, "experiment": run.experiment_name}))
        if settings.verbose:
            what = "continuing run" if previous == run.run_id else "run"
            print(f"MLflow: {what} {run.run_id} in experiment {run.experiment_name} at {run.tracking_uri}; "
                  f"checkpoints in {run_folder} (--name {name} continues this run)", flush=True)

    trainer = build_trainer(cfg, settings, run_id=run.run_id if run else None, tracking_uri=run.tracking_uri if run else None,
                            semi_synthetic=dataset.semi_synthetic, storage_path=location, name=name, callbacks=callbacks,
                            fatal_file=fatal)
    # Ray Train's fit() installs a Ctrl-C handler that aborts its run and leaves it installed after
    # the run: a Ctrl-C during the registration below only "aborted" the finished run (a third one
    # exited with status 0), and the handler kept the run's controller actor alive. Put ours back.
    sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        result = trainer.fit()
        if result.error is not None:  # older behaviour: the error on the result instead of raised
            raise result.error
    except BaseException as e:
        recorded = read_fatal(fatal)
        if run is not None:
            # a signal turned into an exit (jobs/train.py's SIGTERM) or Ctrl-C: killed, not failed
            left = _end_failed_run(run, "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
            if left and isinstance(recorded, tracking.TrackingStoreError):  # the user's one line says it
                recorded = tracking.TrackingStoreError(recorded.uri, recorded.what, recorded.reason, note=left)
        if recorded is not None:  # the worker's own error, whole, instead of Ray's wrapper around it
            raise recorded from e
        raise
    finally:
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)

    ckpt_dir, got = _outcome_of(result.checkpoint, run_folder, cfg)
    outcome = TrainOutcome(run.run_id if run else None, run.experiment_id if run else None, run.tracking_uri if run else None,
                           run_folder, ckpt_dir,
                           # a final-only run (a sweep's --final) validates nothing: its selection's metrics
                           got["val"] or (dict(settings.selection_val) if settings.selection_val else None),
                           got["test"], got["best_epoch"], got["weights"],
                           got.get("history", []))
    if run is not None:
        try:
            if ckpt_dir is not None:  # where the final weights are: `jobs/heatmap.py --checkpoint`, any run
                run.set_tags({tracking.CHECKPOINT_TAG: ckpt_dir})
            if settings.register and got["test"] is not None:
                outcome.registered = _register(cfg, dataset, got["state"], run.run_id, outcome.val_metrics or {},
                                               got["test"])
                run.set_tags({tracking.REGISTERED_TAG: f"{outcome.registered.name}/{outcome.registered.version}"})
            run.set_tags({tracking.DESCRIPTION_TAG: run_description(cfg, outcome, semi_synthetic=dataset.semi_synthetic)})
            run.finish("FINISHED")
        except tracking.TrackingStoreError as e:  # trained, but the store failed after: the run is not left RUNNING
            left = _end_failed_run(run, "FAILED")
            raise (tracking.TrackingStoreError(e.uri, e.what, e.reason, note=left) if left else e) from None
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C (or jobs/train.py's SIGTERM) while registering
            _end_failed_run(run, "KILLED")
            raise
    outcome.seconds = time.perf_counter() - t0
    return outcome


def run_description(cfg: RunConfig, outcome: TrainOutcome, *, semi_synthetic: bool) -> str:
    """The run's description in MLflow's UI (Markdown, first lines shown before "Show more"): the test
    T/U/S/H, then the selected epoch, inference weights and validation T/U/S/H, then the registered version."""
    def pct(m: Mapping[str, float]) -> str:
        return " · ".join(f"{k} {100 * m[k]:.1f}" for k in "TUSH" if k in m) + " (%)"

    fam = family_of(cfg)
    data = "semi-synthetic data: not a benchmark result" if semi_synthetic else "real features"
    lines = [f"**{fam.describe(cfg)}**, protocol {cfg.protocol}, {data}."]
    if outcome.test_metrics:
        lines.append(f"**Test**: {pct(outcome.test_metrics)}.")
    weights = ", ".join(f"{k} {v:.2f}" for k, v in outcome.weights.items())
    selected = f"Selected on validation: epoch {outcome.best_epoch}" + (f" ({weights})" if weights else "")
    lines.append(selected + (f"; validation {pct(outcome.val_metrics)}." if outcome.val_metrics else "."))
    if outcome.registered is not None:
        r = outcome.registered
        lines.append(f"Registered as `{r.name}` version {r.version}: {r.champion_line()}.")
    return "\n\n".join(lines)


def _register(cfg: RunConfig, dataset: FeatureDataset, state: Mapping[str, Any], run_id: str,
              val: Mapping[str, float], test: Mapping[str, float]) -> Any:
    """Rebuild the final weights from the last checkpoint and register them (driver side)."""
    from dedn.tracking import registry  # MLflow: the driver alone registers (module docstring)

    final_cfg = RunConfig.from_dict(state["config"], source=f"checkpoint of run {run_id}")
    model = last_model(state, final_cfg, dataset)
    example = next(iter(ShardReader(dataset, "trainval", batch_size=1, shuffle=False))).features.numpy()  # (1, C, H, W)
    return registry.register_model(model, final_cfg, dataset.class_side, run_id=run_id, val_metrics=val,
                                   test_metrics=test, input_example=example, semi_synthetic=dataset.semi_synthetic)
