"""Distributed training of DEDN on Ray Train (V2 `TorchTrainer`, DDP), tracked in MLflow.

The driver (`train`) creates the MLflow store, experiment and run, then starts a TorchTrainer
whose workers run `train_loop_per_worker`:

* every worker opens the dataset and streams its own disjoint part of each split's Parquet
  shards (`ShardReader(rank, world_size)` inside `dedn.engine.run_phase`);
* DDP over gloo (CPU) or NCCL (GPU, with bf16 autocast); validation counts are all-reduced
  with `torch.distributed`, so every rank computes the same T/U/S/H;
* the engine's two-phase protocol: **select** (train on `train`, validate every epoch, keep the
  best epoch and lambdas) then **final** (retrain on `trainval` for that many epochs, test once);
* every epoch all ranks call `ray.train.report(metrics, checkpoint=...)`; rank 0 alone writes
  the checkpoint folder (`state.pt`: the engine's checkpoint dict; `progress.json`: phase and
  the selection's outcome), prints progress and logs to MLflow;
* after a worker failure Ray restarts the group (`FailureConfig(max_failures)`), and the loop
  continues from `ray.train.get_checkpoint()` — the engine restores model, optimiser, history,
  best-so-far and RNG state.

The driver then loads the final weights from the last checkpoint and registers them
(`dedn.registry`). Test hooks (`DebugHooks`): record which samples each rank trained on and a
digest of its parameters, and make one rank raise once at a given epoch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from dedn.atomic import write_text
from dedn.checkpoint import load_checkpoint, save_checkpoint
from dedn.config import DEDNConfig
from dedn.dataset import FeatureDataset
from dedn.errors import ConfigError

__all__ = [
    "STATE_FILE", "PROGRESS_FILE", "SCORE_ATTRIBUTE", "TrainSettings", "DebugHooks", "TrainOutcome",
    "init_ray", "cpus_per_worker", "train_loop_per_worker", "build_trainer", "train", "feature_digest",
    "params_digest", "epoch_metrics",
]

CHECKPOINT_TAG = "dedn.checkpoint_dir"  # MLflow tag of a run: its last Ray Train checkpoint folder
STATE_FILE = "state.pt"  # the engine's checkpoint dict (torch.save of tensors and plain values)
PROGRESS_FILE = "progress.json"  # {"phase": "select"|"final", "selection": {...} once selection is done}
SCORE_ATTRIBUTE = "val_H"  # CheckpointConfig ranks checkpoints by validation H


class InjectedFault(RuntimeError):
    """Raised on purpose by DebugHooks.fail_* to exercise fault tolerance."""


@dataclass(frozen=True)
class DebugHooks:
    """Test switches, off by default.

    record_dir: each rank writes `rank<r>.json` there: per phase and epoch the digests of the
    feature rows it trained on (see `feature_digest`), and a digest of its final parameters.
    fail_rank / fail_epoch / fail_marker: rank `fail_rank` raises InjectedFault in the middle of
    epoch `fail_epoch` of the select phase (after its first training step) if `fail_marker` does
    not exist yet; it creates the marker first, so the fault happens once per marker.
    """

    record_dir: str = ""
    fail_rank: int = 1
    fail_epoch: int = 0  # 0 = never
    fail_marker: str = ""


@dataclass(frozen=True)
class TrainSettings:
    """How the run is distributed, checkpointed and tracked (not part of the model config)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.0  # 0 = fit the cluster: min(1, CPUs / workers) without a GPU
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    num_to_keep: int = 2  # checkpoints kept (best val H; the latest is always kept)
    storage_path: str = ""  # Ray Train storage; "" = <DEDN_HOME>/ray_results
    name: str = ""  # Ray Train run name; "" = dedn-<dataset>-<time>-<id> (a new run)
    experiment: str = ""  # MLflow experiment; "" = dedn-<dataset>
    register: bool = True  # register the final model (needs protocol two_phase or final)
    track: bool = True  # MLflow on; False = no run, no registry
    parent_run_id: str = ""  # nest the MLflow run under this run (ablations, comparisons)
    tags: Mapping[str, str] = field(default_factory=dict)  # extra MLflow tags of the run
    verbose: bool = True  # rank-0 progress lines on stdout
    ray_info_logs: bool = False  # Ray Train's own INFO logs (one line per report and rank)
    debug: DebugHooks = field(default_factory=DebugHooks)

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ConfigError("--num-workers", "an int >= 1", self.num_workers, "command line")
        if self.cpus_per_worker < 0:
            raise ConfigError("--cpus-per-worker", ">= 0", self.cpus_per_worker, "command line")
        if self.max_failures < 0:
            raise ConfigError("--max-failures", ">= 0", self.max_failures, "command line")
        if self.num_to_keep < 1:
            raise ConfigError("--num-to-keep", ">= 1", self.num_to_keep, "command line")


@dataclass
class TrainOutcome:
    """What `train` hands back to the job: metrics, where things went, the registered version."""

    run_id: str | None
    experiment_id: str | None
    tracking_uri: str | None
    storage_dir: str
    checkpoint_dir: str | None
    metrics: dict[str, Any]  # the last report of rank 0 (test_* after the final phase)
    val_metrics: dict[str, float] | None
    test_metrics: dict[str, float] | None
    best_epoch: int
    lambdas: tuple[float, float]
    registered: Any = None  # dedn.registry.RegisteredVersion
    seconds: float = 0.0


# ---- Ray -------------------------------------------------------------------------------------
def init_ray(dashboard: bool = False) -> None:
    """Connect to a running cluster (`ray job submit`, `ray start`), else start an embedded one.

    dashboard: give the embedded Ray its dashboard (its State API frees each finished Ray Train
    run's placement group at once; a sweep of TorchTrainer trials needs that, see tuning/tune.py).

    `address="auto"` joins a cluster when there is one (`ray job submit` sets RAY_ADDRESS; `ray
    start` leaves its address on the node); otherwise an embedded Ray starts. The embedded one
    skips the dashboard (about 1 GB RSS). Without the dashboard's State API, Ray Train's
    placement-group cleaner logs a warning every second that it cannot query the controller
    (harmless: the group is removed at shutdown); its Ray-internal loggers are raised to ERROR
    there. Our progress lines are printed, not logged, so they still show.
    """
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        if os.environ.get("RAY_ADDRESS"):  # a named cluster that is not there: say so, do not start another
            raise
        if dashboard:
            ray.init(log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True, logging_config=ray.LoggingConfig(log_level="ERROR"))


def cpus_per_worker(num_workers: int, use_gpu: bool, requested: float = 0.0) -> float:
    """CPUs each worker asks Ray for: `requested`, else what fits the cluster next to the controller.

    On a 2-CPU machine 2 workers get 1 CPU each (Train V2's controller needs none); fractional
    values keep small clusters schedulable.
    """
    if requested > 0:
        return float(requested)
    import ray

    per = float(ray.cluster_resources().get("CPU", 1.0)) / num_workers
    # CPU training: one core each is what a worker uses well; GPU workers get a few for the reader
    return max(0.25, min(per, 4.0 if use_gpu else 1.0))


def torch_threads(cpus: float) -> int:
    """Intra-op threads of a worker: its whole CPUs, at least one (more would oversubscribe the node)."""
    return max(1, int(math.floor(cpus)))


# ---- digests (test hooks) ---------------------------------------------------------------------
def feature_digest(features: torch.Tensor) -> list[str]:
    """One short hex digest per row of features (B, ...): identifies a sample by its exact feature bytes."""
    rows = features.detach().to("cpu", torch.float32).contiguous().reshape(features.shape[0], -1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=8).hexdigest() for r in rows]


def params_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name order): equal digests = bitwise-equal models."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- metrics of one epoch ----------------------------------------------------------------------
_TRAIN_SKIP = ("steps", "images", "seconds", "data_wait_frac", "images_per_s")


def epoch_metrics(report: Mapping[str, Any], images_per_s: float, epoch_time_s: float) -> dict[str, float]:
    """MLflow / Ray metrics of one run_phase report; final-phase keys carry the prefix `final_`.

    select: every loss part, images_per_s, epoch_time_s, data_wait_frac, val_T/U/S/H (at the
    fitted lambdas when fitting, else at cfg's), lambda_rc, lambda_e. final: the same training
    keys prefixed, and test_T/U/S/H on the last epoch.
    """
    train = report["train"]
    pre = "" if report["phase"] == "select" else "final_"
    out: dict[str, float] = {f"{pre}{k}": float(v) for k, v in train.items() if k not in _TRAIN_SKIP}
    out[f"{pre}images_per_s"] = float(images_per_s)
    out[f"{pre}epoch_time_s"] = float(epoch_time_s)
    out[f"{pre}data_wait_frac"] = float(train.get("data_wait_frac", 0.0))
    if report["phase"] == "select":
        val = report.get("val_best") or report.get("val") or {}
        out.update({f"val_{k}": float(v) for k, v in val.items()})
        lam = report.get("lambdas")
        if lam is not None:
            out["lambda_rc"], out["lambda_e"] = float(lam[0]), float(lam[1])
        if report.get("best") is not None:
            out["best_val_H"] = float(report["best"]["H"])  # best epoch so far (Tune's metric may name it)
        out["epoch"] = float(report["epoch"])
    if report.get("test"):
        out.update({f"test_{k}": float(v) for k, v in report["test"].items()})
    return out


def _peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _progress_line(report: Mapping[str, Any], m: Mapping[str, float], world_size: int) -> str:
    """One console line: phase, epoch, loss terms, images/s, validation (or test) T/U/S/H in %."""
    pre = "" if report["phase"] == "select" else "final_"
    parts = [k for k in report["train"] if k not in _TRAIN_SKIP and k != "loss"]
    losses = " ".join(f"{k} {report['train'][k]:.4g}" for k in parts)
    s = (f"[{report['phase']:6s}] epoch {report['epoch']:3d}/{report['epochs']:<3d} loss {report['train']['loss']:.4g} "
         f"({losses})  {m[pre + 'images_per_s']:.0f} img/s on {world_size} worker(s)  {m[pre + 'epoch_time_s']:.1f} s"
         f"  data wait {100 * m[pre + 'data_wait_frac']:.1f}%  peak RSS {m.get('worker_peak_rss_mib', 0) / 1024:.2f} GB/worker")
    if "val_T" in m:
        s += (f"  val T {100 * m['val_T']:.1f} U {100 * m['val_U']:.1f} S {100 * m['val_S']:.1f} "
              f"H {100 * m['val_H']:.1f} (lambda_rc {m.get('lambda_rc', float('nan')):.2f}, "
              f"lambda_e {m.get('lambda_e', float('nan')):.2f})")
    if "test_H" in m:
        s += f"  TEST T {100 * m['test_T']:.1f} U {100 * m['test_U']:.1f} S {100 * m['test_S']:.1f} H {100 * m['test_H']:.1f}"
    return s


# ---- the worker loop -------------------------------------------------------------------------
class _Recorder:
    """Forward pre-hook on the training model: digests of the rows seen, and the injected fault."""

    def __init__(self, hooks: DebugHooks, rank: int):
        self.hooks, self.rank = hooks, rank
        self.phase, self.epoch, self.steps = "select", 1, 0
        self.seen: dict[str, dict[str, list[str]]] = {}

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not module.training:
            return
        h = self.hooks
        if (h.fail_epoch and self.rank == h.fail_rank and self.phase == "select" and self.epoch == h.fail_epoch
                and self.steps >= 1 and h.fail_marker and not os.path.exists(h.fail_marker)):
            Path(h.fail_marker).write_text(f"rank {self.rank} failed at epoch {self.epoch}\n")
            raise InjectedFault(f"injected fault: rank {self.rank}, select epoch {self.epoch}")
        self.steps += 1
        if h.record_dir:
            self.seen.setdefault(self.phase, {}).setdefault(str(self.epoch), []).extend(feature_digest(args[0]))

    def next_epoch(self, phase: str, epoch: int) -> None:
        self.phase, self.epoch, self.steps = phase, epoch, 0

    def write(self, model: nn.Module) -> None:
        if not self.hooks.record_dir:
            return
        write_text(Path(self.hooks.record_dir) / f"rank{self.rank}.json",
                   json.dumps({"rank": self.rank, "seen": self.seen, "params": params_digest(model)}))


def _say(line: str) -> None:
    """One console line from a worker. Not print(): Train V2 patches print in workers to log AND echo it
    (each line would show twice); a direct write to stdout is forwarded to the driver once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _quiet_ray_train_reports(keep: bool) -> None:
    """Ray Train V2 logs every `report` (metrics dict included) at INFO on every rank, on a logger named
    after its module file, which LoggingConfig does not reach; the progress lines replace it."""
    if keep:
        return
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logs
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _load_resume() -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(engine checkpoint dict, progress) from ray.train.get_checkpoint(), or (None, {})."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, {}
    with ckpt.as_directory() as d:
        state = load_checkpoint(Path(d) / STATE_FILE)
        progress = json.loads((Path(d) / PROGRESS_FILE).read_text())
    return state, progress


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: the engine's protocol with DDP, all-reduced evaluation, reports and MLflow.

    config: {"cfg": DEDNConfig dict (data.path absolute), "use_gpu", "threads", "run_id",
    "tracking_uri", "semi_synthetic", "debug": DebugHooks fields, "verbose"}.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dedn import engine
    from dedn.tracking import RunLogger

    _quiet_ray_train_reports(bool(config.get("ray_info_logs")))
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = DEDNConfig.from_dict(config["cfg"], source="train_loop_config")
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    # The driver opened the dataset with verify="rows"; a worker trusts the manifest, so a sweep's
    # distributed trial never touches the test shards' footers (each reader checks its own shards).
    dataset = FeatureDataset.open(cfg.data.path, verify="none")
    hooks = DebugHooks(**config.get("debug", {}))
    recorder = _Recorder(hooks, rank)
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    verbose = bool(config.get("verbose", True)) and rank == 0
    logger = RunLogger(config["run_id"], config["tracking_uri"]) if rank == 0 and config.get("run_id") else None

    def wrap(model: nn.Module) -> nn.Module:
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
        wrapped.register_forward_pre_hook(recorder)
        return wrapped

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)

    resume, progress = _load_resume()
    if resume is not None and verbose:
        _say(f"resuming from the checkpoint of {progress.get('phase')} epoch {resume['epoch']}")

    def make_on_epoch_end(phase_progress: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        clock = {"t": time.perf_counter()}

        def on_epoch_end(report: dict[str, Any]) -> None:
            stats = report["train"]
            # images/s of the whole group: all images over the slowest rank's training time;
            # the data-wait share and the peak RSS of the worst rank
            t = torch.tensor([stats["images"], stats["seconds"], stats.get("data_wait_frac", 0.0), _peak_rss_mib()],
                             dtype=torch.float64, device=device)
            if distributed:
                imgs = t[:1].clone()
                dist.all_reduce(imgs, op=dist.ReduceOp.SUM)
                worst = t[1:].clone()
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                t = torch.cat([imgs, worst])
            images_per_s = float(t[0] / t[1]) if float(t[1]) > 0 else 0.0
            now = time.perf_counter()
            metrics = epoch_metrics({**report, "train": {**stats, "data_wait_frac": float(t[2])}}, images_per_s,
                                    now - clock["t"])
            metrics["worker_peak_rss_mib"] = float(t[3])
            clock["t"] = now
            # final-phase epochs have no validation: NaN ranks them below every selection epoch
            # (Ray keeps the latest checkpoint whatever its score)
            metrics.setdefault(SCORE_ATTRIBUTE, float("nan"))
            metrics.update(phase=report["phase"], epoch=int(report["epoch"]))
            if "selection" in phase_progress:
                sel = phase_progress["selection"]
                metrics.update({f"selected_val_{k}": float(v) for k, v in (sel["val_metrics"] or {}).items()})
                metrics.update(best_epoch=int(sel["best_epoch"]), selected_lambda_rc=float(sel["lambdas"][0]),
                               selected_lambda_e=float(sel["lambdas"][1]))
            if verbose:
                _say(_progress_line(report, metrics, world_size))
            if logger is not None:
                numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("epoch",)
                           and not k.startswith("selected_") and k != "best_epoch" and math.isfinite(float(v))}
                logger.log_metrics(numeric, step=int(report["epoch"]))
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    save_checkpoint(Path(d) / STATE_FILE, report["state"]())
                    (Path(d) / PROGRESS_FILE).write_text(json.dumps(phase_progress))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint,
                                 checkpoint_dir_name=f"{report['phase']}-epoch{int(report['epoch']):04d}")
            recorder.next_epoch(report["phase"], int(report["epoch"]) + 1)

        return on_epoch_end

    common = dict(rank=rank, world_size=world_size, device=device, wrap_model=wrap,
                  all_reduce=all_reduce if distributed else None, autocast_dtype=autocast_dtype)
    selection = progress.get("selection")
    final_cfg, final_epochs = cfg, cfg.optim.epochs
    if cfg.protocol in ("two_phase", "select") and selection is None:
        sel_resume = resume if progress.get("phase") == "select" else None
        recorder.next_epoch("select", int(sel_resume["epoch"]) + 1 if sel_resume else 1)
        sel = engine.run_phase(cfg, dataset, "select", on_epoch_end=make_on_epoch_end({"phase": "select"}),
                               resume=sel_resume, **common)
        selection = {"best_epoch": int(sel.best_epoch), "lambdas": [float(x) for x in sel.lambdas],
                     "val_metrics": sel.best_metrics}
        resume = None
        if logger is not None:
            logger.log_metrics({"best_epoch": float(sel.best_epoch), "selected_lambda_rc": sel.lambdas[0],
                                "selected_lambda_e": sel.lambdas[1],
                                **{f"selected_val_{k}": float(v) for k, v in (sel.best_metrics or {}).items()}}, step=0)
        if cfg.protocol == "select":
            recorder.write(engine.model_from_state(cfg, dataset, sel.state["model"]))
            return
    if selection is not None:
        final_cfg = engine.final_config(cfg, selection["best_epoch"], selection["lambdas"])
        final_epochs = final_cfg.optim.epochs
    fin_progress: dict[str, Any] = {"phase": "final"}
    if selection is not None:
        fin_progress["selection"] = selection
    fin_resume = resume if progress.get("phase") == "final" else None
    recorder.next_epoch("final", int(fin_resume["epoch"]) + 1 if fin_resume else 1)
    fin = engine.run_phase(final_cfg, dataset, "final", epochs=final_epochs,
                           on_epoch_end=make_on_epoch_end(fin_progress), resume=fin_resume, **common)
    recorder.write(engine.model_from_state(final_cfg, dataset, fin.state["model"]))
    if logger is not None and fin.test is not None:
        _log_final_artifacts(logger, cfg, final_cfg, dataset, selection, fin, bool(config.get("semi_synthetic")))


def _log_final_artifacts(logger: Any, cfg: DEDNConfig, final_cfg: DEDNConfig, dataset: FeatureDataset,
                         selection: Mapping[str, Any] | None, fin: Any, semi_synthetic: bool) -> None:
    """Rank 0, after the final phase: config YAMLs, final metrics JSON, per-class CSV, training curves."""
    from dedn.plots import plot_training_curves

    logger.log_text(cfg.to_yaml(), "config.yaml")
    logger.log_text(final_cfg.replace(**{"optim.epochs": fin.epochs}).to_yaml(), "config_final.yaml")
    summary = {
        "dataset": cfg.dataset, "variant": cfg.variant, "protocol": cfg.protocol, "semi_synthetic": semi_synthetic,
        "data_path": cfg.data.path, "best_epoch": selection["best_epoch"] if selection else None,
        "lambdas": [final_cfg.eval.lambda_rc, final_cfg.eval.lambda_e],
        "val": selection["val_metrics"] if selection else None, "test": fin.test.metrics,
        "final_epochs": fin.epochs,
    }
    logger.log_dict(summary, "final_metrics.json")
    names = dataset.class_side.class_names
    rows = [{"class_id": r.class_id, "class_name": names[r.class_id], "side": r.side,
             "t_acc": "" if r.t_acc is None else f"{r.t_acc:.6f}", "gzsl_acc": f"{r.gzsl_acc:.6f}", "n": r.n}
            for r in fin.test.per_class]
    logger.log_table_csv(rows, "per_class_accuracy.csv")
    with tempfile.TemporaryDirectory() as d:
        # the select phase's curves when there was one (validation lives there), else the final phase's
        history = _history_rows(logger, "" if selection else "final_")
        path = plot_training_curves(history, Path(d) / "training_curves.png",
                                    title=f"DEDN {cfg.dataset} ({cfg.variant})", semi_synthetic=semi_synthetic)
        logger.log_file(path)


def _history_rows(logger: Any, prefix: str) -> list[dict[str, float]]:
    """Per-epoch rows of one phase read back from MLflow (complete even after worker restarts)."""
    from dedn.plots import LOSS_KEYS, VAL_KEYS

    rows: dict[int, dict[str, float]] = {}
    for k in [prefix + k for k in LOSS_KEYS] + [f"val_{k}" for k in VAL_KEYS]:
        for step, value in logger.history(k):
            rows.setdefault(step, {"epoch": step})[k[len(prefix):] if k.startswith(prefix) else k] = value
    return [rows[s] for s in sorted(rows)]


# ---- the driver ------------------------------------------------------------------------------
def build_trainer(cfg: DEDNConfig, settings: TrainSettings, *, run_id: str | None, tracking_uri: str | None,
                  semi_synthetic: bool, storage_path: str, name: str,
                  loop: Callable[[dict[str, Any]], None] | None = None, callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer of one run (Ray must be initialised).

    loop: the worker function (default `train_loop_per_worker`; a sweep wraps it in its test-split
    guard); callbacks: Ray Train callbacks (a sweep's TuneReportCallback).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cpus = cpus_per_worker(settings.num_workers, settings.use_gpu, settings.cpus_per_worker)
    resources: dict[str, float] = {"CPU": cpus}
    if settings.use_gpu:
        resources["GPU"] = 1.0
    loop_config = {
        "cfg": cfg.to_dict(), "use_gpu": settings.use_gpu, "threads": torch_threads(cpus), "run_id": run_id,
        "tracking_uri": tracking_uri, "semi_synthetic": semi_synthetic, "verbose": settings.verbose,
        "debug": dataclasses.asdict(settings.debug), "ray_info_logs": settings.ray_info_logs,
    }
    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=settings.num_to_keep, checkpoint_score_attribute=SCORE_ATTRIBUTE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            # Ray Train logs every report at INFO; our rank-0 progress lines say what matters
            logging_config=LoggingConfig(log_level="INFO" if settings.ray_info_logs else "WARNING"),
            callbacks=list(callbacks) or None,
        ),
    )


def _run_name(cfg: DEDNConfig) -> str:
    return f"dedn-{cfg.dataset.lower()}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def train(cfg: DEDNConfig, settings: TrainSettings | None = None) -> TrainOutcome:
    """Run cfg.protocol on Ray Train (initialising Ray if needed), track it, register the final model.

    cfg.data.path must name a dataset directory. Returns a TrainOutcome; raises what the
    workers raised once `max_failures` restarts are used up.
    """
    from dedn import tracking

    settings = settings or TrainSettings()
    t0 = time.perf_counter()
    if not cfg.data.path:
        raise ConfigError("data.path", "a dataset directory (--data DIR)", "", "command line")
    data = str(Path(cfg.data.path).expanduser().resolve())
    dataset = FeatureDataset.open(data)  # fail here, in the driver, on a bad directory
    if dataset.name.upper() != cfg.dataset.upper():
        raise ConfigError("dataset", f"the dataset's name {dataset.name!r} (from {data}/dataset.json)", cfg.dataset, "config")
    cfg = cfg.replace(**{"data.path": data})
    name = settings.name or _run_name(cfg)
    storage = str(Path(settings.storage_path).expanduser().resolve()) if settings.storage_path else str(tracking.dedn_home() / "ray_results")
    Path(storage).mkdir(parents=True, exist_ok=True)

    run_id = exp_id = uri = None
    if settings.track:
        uri = tracking.init_store()  # in the driver, before any worker touches the store
    init_ray()  # before the run's tags: they name the Ray job
    if settings.track:
        extra = {"ray_train_run": name, "num_workers": str(settings.num_workers),
                 "device": "gpu" if settings.use_gpu else "cpu", **settings.tags}
        if settings.parent_run_id:
            extra["mlflow.parentRunId"] = settings.parent_run_id  # MLflow's own nesting tag
        tags = tracking.run_tags(cfg, semi_synthetic=dataset.semi_synthetic, data_path=data, extra=extra)
        exp_id, run_id = tracking.start_run(cfg, run_name=name, tags=tags, experiment=settings.experiment or None)
        print(f"MLflow: run {run_id} in experiment {settings.experiment or tracking.experiment_name(cfg.dataset)} at {uri}",
              flush=True)

    trainer = build_trainer(cfg, settings, run_id=run_id, tracking_uri=uri, semi_synthetic=dataset.semi_synthetic,
                            storage_path=storage, name=name)
    try:
        result = trainer.fit()
    except BaseException:
        if run_id is not None:
            tracking.client().set_terminated(run_id, "FAILED")
        raise
    if result.error is not None:  # older behaviour: the error on the result instead of raised
        if run_id is not None:
            tracking.client().set_terminated(run_id, "FAILED")
        raise result.error

    metrics = dict(result.metrics or {})
    ckpt_dir = result.checkpoint.path if result.checkpoint is not None else None
    val = {k[len("selected_val_"):]: float(v) for k, v in metrics.items() if k.startswith("selected_val_")} or None
    test = {k[len("test_"):]: float(v) for k, v in metrics.items() if k.startswith("test_")} or None
    best_epoch = int(metrics.get("best_epoch", metrics.get("epoch", 0)))
    lambdas = (float(metrics.get("selected_lambda_rc", cfg.eval.lambda_rc)), float(metrics.get("selected_lambda_e", cfg.eval.lambda_e)))
    if cfg.protocol == "select":  # the last report is a selection epoch: read the selection from its checkpoint
        state, _ = _read_checkpoint(ckpt_dir)
        best = state.get("best", {}) if state else {}
        val = best.get("metrics")
        best_epoch = int(best.get("epoch", 0))
        lambdas = tuple(best.get("lambdas", lambdas))  # type: ignore[assignment]
    outcome = TrainOutcome(run_id, exp_id, uri, str(Path(storage) / name), ckpt_dir, metrics, val, test, best_epoch,
                           lambdas)

    if run_id is not None:
        if ckpt_dir is not None:  # where the final weights are: `jobs/heatmap.py --checkpoint`, any run
            tracking.client().set_tag(run_id, CHECKPOINT_TAG, ckpt_dir)
        if settings.register and test is not None and ckpt_dir is not None:
            outcome.registered = _register_from_checkpoint(cfg, dataset, ckpt_dir, run_id, val or {}, test)
            tracking.client().set_tag(run_id, "registered_model_version",
                                      f"{outcome.registered.name}/{outcome.registered.version}")
        tracking.client().set_terminated(run_id, "FINISHED")
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _read_checkpoint(ckpt_dir: str | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    if ckpt_dir is None:
        return None, {}
    return load_checkpoint(Path(ckpt_dir) / STATE_FILE), json.loads((Path(ckpt_dir) / PROGRESS_FILE).read_text())


def _register_from_checkpoint(cfg: DEDNConfig, dataset: FeatureDataset, ckpt_dir: str, run_id: str,
                              val: Mapping[str, float], test: Mapping[str, float]) -> Any:
    """Load the final weights from the last checkpoint and register them (driver side)."""
    from dedn import engine, registry
    from dedn.reader import ShardReader

    state, progress = _read_checkpoint(ckpt_dir)
    assert state is not None
    if progress.get("phase") != "final":
        raise ConfigError("checkpoint", "the final phase's last checkpoint", progress.get("phase"), ckpt_dir)
    final_cfg = DEDNConfig.from_dict(state["config"], source=f"{ckpt_dir}/{STATE_FILE}")
    model = engine.model_from_state(final_cfg, dataset, state["model"])
    example = next(iter(ShardReader(dataset, "trainval", batch_size=1, shuffle=False))).features.numpy()  # (1, C, H, W)
    return registry.register_model(model, final_cfg, dataset.class_side, run_id=run_id, val_metrics=val,
                                   test_metrics=test, input_example=example, semi_synthetic=dataset.semi_synthetic)
