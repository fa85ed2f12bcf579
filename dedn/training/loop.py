"""The training loop: build, train one epoch, evaluate, and `run_phase` / `run_protocol`.

Fixed phases (docs/design.md#the-training-loop): setup -> per epoch train_one_epoch -> evaluate
-> report to the sinks -> cleanup. No Ray, no MLflow: `dedn.training.driver.train_func` (the
one Ray Train function every job, trial and retrain runs) calls `run_protocol` with a DDP
wrapper, a `torch.distributed` collective and its sinks; unit tests call it in-process.
Everything model-specific comes from the run's family (`dedn.families`).

Protocol `two_phase`: **select** trains on `train` and evaluates `val_seen` / `val_unseen`
every epoch, keeping the epoch and the family's inference weights with the best validation H;
**final** retrains on `trainval` from the same seed for that many epochs and evaluates
`test_seen` / `test_unseen` once, at the selected weights. The test splits are forbidden
during selection.
"""
from __future__ import annotations

import copy
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dedn.checkpoint import CheckpointError, rng_state, set_rng_state
from dedn.config import RunConfig
from dedn.data import FeatureDataset
from dedn.data.class_side import ClassSide
from dedn.data.loader import ShardIterableDataset
from dedn.data.reader import Batch, ShardReader, forbid_splits
from dedn.data.resident import ResidentData, SplitLoader
from dedn.errors import ConfigError, NonFiniteLossError
from dedn.families import family_of
from dedn.families.base import PhaseData, StepContext, unwrap_model
from dedn.families.capabilities import PreparesPhases, RefitsBeforeEval, WrapsForDDP, training_module
from dedn.protocol import PHASES, TEST_SPLITS, ClassProtocol
from dedn.seeds import derive_seed, seed_everything, seeded
from dedn.training.evaluate import Collective, EvalResult, evaluate
from dedn.training.report import Best, EpochReport, Sink, emit

__all__ = [
    "NonFiniteLossError", "PhaseResult", "ProtocolResult", "build_model", "model_from_state", "unwrap_model",
    "train_one_epoch", "run_phase", "run_protocol", "final_config", "phase_seed",
]


# ---- models ------------------------------------------------------------------------------
def build_model(cfg: RunConfig, class_side: ClassSide, feature_shape: Sequence[int],
                meta: Mapping[str, Any] | None = None) -> nn.Module:
    """The run's family's network, initialised from cfg.optim.seed alone (identical on every rank).

    The global RNG is left as it was: initialisation draws from a forked generator.
    """
    family = family_of(cfg)
    with seeded(cfg.optim.seed):
        return family.build(cfg, class_side, tuple(int(x) for x in feature_shape), meta)  # type: ignore[arg-type]


def model_from_state(cfg: RunConfig, dataset: FeatureDataset, model_state: Mapping[str, Tensor],
                     meta: Mapping[str, Any] | None = None) -> nn.Module:
    """The network of a checkpoint's model state, built for `dataset`, on CPU."""
    model = build_model(cfg, dataset.class_side, dataset.feature_shape, meta)
    model.load_state_dict(dict(model_state))
    return model


def _timed(batches: Iterable[Batch]) -> Iterator[tuple[Batch, float]]:
    """Yields (batch, seconds spent waiting for it)."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


# ---- one epoch ---------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizers: Mapping[str, torch.optim.Optimizer],
                    protocol: ClassProtocol, cfg: RunConfig, *, device: str | torch.device = "cpu",
                    autocast_dtype: torch.dtype | None = None, max_steps: int = 0, epoch: int = 0) -> dict[str, Any]:
    """One pass over `batches` (features (B, C, H, W), labels (B,)); at most `max_steps` steps when > 0.

    Each step is the family's `train_step`. Returns {"losses": mean of every loss part over the
    steps that reported it,
    "steps", "images", "seconds", "data_wait_frac"}. A NaN/inf loss raises NonFiniteLossError
    before any update of that step.
    """
    device = torch.device(device)
    family = family_of(cfg)
    ctx = StepContext(cfg=cfg, protocol=protocol, optimizers=optimizers, device=device, autocast_dtype=autocast_dtype,
                      epoch=epoch)
    model.train()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # a part may come from some steps only (D3GZSL's generator step)
    steps = images = 0
    wait = 0.0
    t_start = time.perf_counter()
    for batch, waited in _timed(batches):
        wait += waited
        # Readers hand over the storage dtype (float16: half the bytes to copy to a GPU); the conversion
        # to float32 happens on the training device, as part of the step.
        x = batch.features.to(device, torch.float32, non_blocking=True)  # (B, C, H, W)
        y = batch.labels.to(device, non_blocking=True)  # (B,)
        ctx.step = steps + 1
        for k, v in family.train_step(model, x, y, ctx).items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        steps += 1
        images += int(y.shape[0])
        if max_steps and steps >= max_steps:
            break
    seconds = time.perf_counter() - t_start
    return {"losses": {k: v / counts[k] for k, v in sums.items()}, "steps": steps, "images": images,
            "seconds": seconds, "data_wait_frac": wait / seconds if seconds > 0 else 0.0}


# ---- one phase ---------------------------------------------------------------------------
@dataclass
class PhaseResult:
    """What a phase produced.

    select: best (epoch, validation metrics and weights of the best epoch), best_state (CPU
    model state of that epoch). final: best = the last epoch with its test metrics; test.
    Both: history (one EpochReport per epoch), state (the checkpoint dict after the last epoch).
    """

    phase: str
    epochs: int
    best: Best
    history: list[EpochReport]
    state: dict[str, Any]
    best_state: dict[str, Tensor] | None = None
    test: EvalResult | None = None


def phase_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """A torch/numpy/random seed for (seed, rank[, epoch]): runtime randomness differs per rank, reproducibly."""
    return derive_seed(seed, rank, *([epoch] if epoch else []))


def _to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists with every tensor copied to the CPU (checkpoints load anywhere)."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _loader(reader: ShardReader, workers: int) -> Iterable[Batch]:
    """The reader itself, or a DataLoader over it with `workers` processes (streaming only: a resident
    split is gathered in this process, faster than any worker could hand batches over)."""
    if workers <= 0 or reader.resident is not None:
        return reader
    return torch.utils.data.DataLoader(ShardIterableDataset(reader, workers), batch_size=None, num_workers=workers)


def _check_resume(resume: Mapping[str, Any], cfg: RunConfig, phase: str, epochs: int) -> int:
    for key in ("model", "optimizers", "epoch", "phase"):
        if key not in resume:
            raise CheckpointError("resume", f"a run_phase checkpoint dict with {key!r}", f"keys {sorted(resume)}")
    if resume["phase"] != phase:
        raise CheckpointError("resume", f"a checkpoint of phase {phase!r}", repr(resume["phase"]))
    start = int(resume["epoch"]) + 1
    if start > epochs + 1:
        raise CheckpointError("resume", f"a checkpoint at epoch <= {epochs}", resume["epoch"])
    saved = resume.get("config", {}).get("model")
    if saved is not None and saved != cfg.to_dict()["model"]:
        raise CheckpointError("resume", f"model config {cfg.to_dict()['model']}", saved)
    return start


def _peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _group_stats(stats: Mapping[str, Any], collective: Collective | None, device: torch.device
                 ) -> tuple[int, float, float, float, float]:
    """(images of the group, slowest rank's seconds, worst data-wait share, worst peak RSS MiB, worst
    peak GPU memory MiB (torch's allocator; 0 on CPU))."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    imgs = torch.tensor([float(stats["images"])], dtype=torch.float64)
    worst = torch.tensor([stats["seconds"], stats["data_wait_frac"], _peak_rss_mib(), gpu], dtype=torch.float64)
    if collective is not None:
        if device.type == "cuda":  # NCCL reduces device tensors
            imgs, worst = imgs.to(device), worst.to(device)
        collective.sum_(imgs)
        collective.max_(worst)
    imgs, worst = imgs.cpu(), worst.cpu()
    return int(imgs[0]), float(worst[0]), float(worst[1]), float(worst[2]), float(worst[3])


def run_phase(cfg: RunConfig, dataset: FeatureDataset, phase: str, *, rank: int = 0, world_size: int = 1,
              device: str | torch.device = "cpu", wrap_model: Callable[[nn.Module], nn.Module] | None = None,
              collective: Collective | None = None, sinks: Sequence[Sink] = (), resume: Mapping[str, Any] | None = None,
              epochs: int | None = None, autocast_dtype: torch.dtype | None = None,
              extra_state: Mapping[str, Any] | None = None, split_loader: SplitLoader | None = None,
              announce: Callable[[str], None] | None = None) -> PhaseResult:
    """Train one phase ("select" or "final"); the only training loop (see module docstring).

    wrap_model: the training-time module around the network (the driver: the family's `wrap` with
    DDP, then its training callbacks'); default the family's `wrap` without DDP.
    epochs: defaults to cfg.optim.epochs. final evaluates the test splits once, after the last
    epoch, at cfg.eval's weights (set them to the selected ones). Every epoch's EpochReport
    goes to each sink with a function returning the checkpoint dict (extra_state merged in).
    resume: a checkpoint dict of this phase; training continues at its epoch + 1.
    split_loader: where resident splits come from (cfg.data.resident; dedn.data.resident): the
    driver passes the node-shared copy; default a decode in this process. announce: where to say
    what was chosen per split (the driver: rank 0's console when verbose).
    """
    if phase not in PHASES:
        raise ConfigError("phase", f"one of {'|'.join(PHASES)}", phase, "run_phase")
    epochs = cfg.optim.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ConfigError("optim.epochs", ">= 1", epochs, "run_phase")
    if cfg.train.compile and isinstance(family_of(cfg), WrapsForDDP):
        # its train_step reaches each separately stepped network through its own wrapper (and DDP
        # around each): one compiled module around that wrapper would hide them (and bypass DDP)
        raise ConfigError("train.compile", f"false for {cfg.model.name} (its networks are stepped separately)",
                          True, "run config")
    with forbid_splits(TEST_SPLITS) if phase == "select" else nullcontext():
        state = _Phase(cfg, dataset, phase, rank, world_size, torch.device(device), collective, autocast_dtype,
                       epochs, dict(extra_state or {}), split_loader, announce)
        try:
            return state.run(wrap_model, sinks, resume)
        finally:
            state.release()


class _Phase:
    """The state of one phase between epochs (model, optimisers, readers, best so far, history)."""

    def __init__(self, cfg: RunConfig, ds: FeatureDataset, phase: str, rank: int, world_size: int,
                 device: torch.device, collective: Collective | None, autocast_dtype: torch.dtype | None,
                 epochs: int, extra_state: dict[str, Any], split_loader: SplitLoader | None = None,
                 announce: Callable[[str], None] | None = None):
        self.cfg, self.ds, self.phase, self.rank, self.world_size = cfg, ds, phase, rank, world_size
        # What the steps and optimisers see: optim.lr under optim.lr_scaling for this many workers
        # (checkpoints and logs keep the configured value).
        lr = cfg.optim.scaled_lr(cfg.optim.lr, world_size)
        self.step_cfg = cfg if lr == cfg.optim.lr else cfg.replace(**{"optim.lr": lr})
        self.device, self.collective, self.autocast_dtype, self.epochs = device, collective, autocast_dtype, epochs
        self.extra_state = extra_state
        self.family = family_of(cfg)
        self.protocol = ClassProtocol.for_phase(phase, ds.class_side)
        seed_everything(phase_seed(cfg.optim.seed, rank))
        # setup: model (identical init on every rank), optimisers
        self.model = build_model(cfg, ds.class_side, ds.feature_shape).to(device)
        self.optimizers = self.family.optimizers(self.step_cfg, self.model)
        self.epoch = 0
        self.history: list[EpochReport] = []
        self.best = Best(weights=self.family.configured_weights(cfg))
        self.best_state: dict[str, Tensor] | None = None
        self.resident = ResidentData(ds, cfg.data.resident, cfg.data.resident_budget_mib, device, load=split_loader,
                                     announce=announce, device_fraction=cfg.data.resident_device_fraction)
        self.data = PhaseData(phase, PHASES[phase][0], self.protocol,
                              lambda: ShardReader(ds, PHASES[phase][0], batch_size=cfg.eval.batch_size, shuffle=False,
                                                  resident=self.resident.get(PHASES[phase][0])))

    def release(self) -> None:
        """Let go of the phase's decoded splits and the family's cache now. The phase's data closure
        refers back to the phase (a cycle), so without this a selection phase's device copies stayed
        allocated until Python's cycle collector ran, possibly well into the final phase."""
        self.resident.splits.clear()
        self.data.cache.clear()

    def _ctx(self) -> StepContext:
        return StepContext(cfg=self.step_cfg, protocol=self.protocol, optimizers=self.optimizers, device=self.device,
                           autocast_dtype=self.autocast_dtype, epoch=self.epoch)

    def restore(self, resume: Mapping[str, Any]) -> int:
        start = _check_resume(resume, self.cfg, self.phase, self.epochs)
        self.model.load_state_dict(resume["model"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(resume["optimizers"][name])
        self.history = [EpochReport.from_dict(h) for h in resume.get("history", [])]
        self.best = Best.from_dict(resume["best"]) if "best" in resume else self.best
        self.best_state = resume.get("best_model")
        if "rng" in resume:
            set_rng_state(resume["rng"])
        self.epoch = start - 1
        return start

    def state(self) -> dict[str, Any]:
        st: dict[str, Any] = {
            "model": _to_cpu(self.model.state_dict()),
            "optimizers": {k: _to_cpu(o.state_dict()) for k, o in self.optimizers.items()},
            "config": self.cfg.to_dict(), "phase": self.phase, "epoch": self.epoch, "epochs": self.epochs,
            "best": self.best.to_dict(), "history": [h.to_dict() for h in self.history], "rng": rng_state(),
            "meta": self.family.model_meta(self.model), **copy.deepcopy(self.extra_state),
        }
        if self.best_state is not None:
            st["best_model"] = self.best_state
        return st

    def _readers(self, split: str, train: bool) -> ShardReader:
        o, d, ds = self.cfg.optim, self.cfg.data, self.ds
        store = getattr(torch, ds.storage_dtype)  # batches in storage dtype: converted on the device (train_one_epoch)
        if train:
            row_bytes = ds.feature_size * np.dtype(ds.storage_dtype).itemsize
            return ShardReader(ds, split, batch_size=o.batch_size, shuffle=True, seed=o.seed, rank=self.rank,
                               world_size=self.world_size, buffer_rows=d.shuffle_rows(row_bytes),
                               class_balanced=d.class_balanced, equal_rows=True, resident=self.resident.get(split),
                               out_dtype=store, pin_memory=self.device.type == "cuda")
        # Validation is read every epoch: resident when it fits. The test splits are read once: streamed.
        resident = self.resident.get(split) if self.phase == "select" else None
        return ShardReader(ds, split, batch_size=self.cfg.eval.batch_size, shuffle=False, rank=self.rank,
                           world_size=self.world_size, equal_rows=False, resident=resident, out_dtype=store,
                           pin_memory=self.device.type == "cuda")

    def _evaluate(self, seen: str, unseen: str, fit: bool | None = None) -> EvalResult:
        if isinstance(self.family, RefitsBeforeEval):
            self.family.before_eval(self.model, self.data, self._ctx())
        return evaluate(self.model, self._readers(seen, False), self._readers(unseen, False), self.protocol, self.cfg,
                        device=self.device, collective=self.collective, autocast_dtype=self.autocast_dtype,
                        fit_weights=fit)

    def run(self, wrap_model: Callable[[nn.Module], nn.Module] | None, sinks: Sequence[Sink],
            resume: Mapping[str, Any] | None) -> PhaseResult:
        start = self.restore(resume) if resume is not None else 1
        if resume is None and isinstance(self.family, PreparesPhases):
            self.family.prepare(self.model, self.data, self._ctx())  # before DDP copies rank 0's weights
            if self.collective is not None and self.world_size > 1:
                # What a phase's preparation fitted (D3GZSL's scaler and frozen teacher) is no network DDP
                # wraps, so nothing else syncs it: every rank takes rank 0's, rather than trusting every GPU
                # to compute it bit for bit alike (a cluster of mixed GPUs would drift apart silently).
                for t in self.model.state_dict().values():
                    self.collective.broadcast_(t)
        wrapped = wrap_model(self.model) if wrap_model is not None else training_module(self.family, self.model,
                                                                                         lambda m: m)
        if self.cfg.train.compile:  # the training module's forward, DDP included (docs/scaling.md: measured)
            wrapped = torch.compile(wrapped)
        train_split, seen_split, unseen_split = PHASES[self.phase]
        train_reader = self._readers(train_split, True)
        if self.phase == "select":  # decided now, so the choices print before the first epoch
            for split in (seen_split, unseen_split):
                self.resident.get(split)
        test: EvalResult | None = None
        for epoch in range(start, self.epochs + 1):
            self.epoch = epoch
            t0 = time.perf_counter()
            # Every rank's runtime randomness (D3GZSL's noise draws) restarts from (seed, rank, epoch): a
            # checkpoint holds rank 0's RNG state only, so a resumed rank 1 must not depend on it.
            seed_everything(phase_seed(self.cfg.optim.seed, self.rank, epoch))
            train_reader.set_epoch(epoch)
            stats = train_one_epoch(wrapped, _loader(train_reader, self.cfg.data.loader_workers), self.optimizers,
                                    self.protocol, self.step_cfg, device=self.device, autocast_dtype=self.autocast_dtype,
                                    max_steps=self.cfg.optim.max_steps_per_epoch, epoch=epoch)
            images, seconds, wait, rss, gpu = _group_stats(stats, self.collective, self.device)
            report = EpochReport(self.phase, epoch, self.epochs, stats["losses"], stats["steps"], images, seconds, wait,
                                 rss, self.best, resident_mib=self.resident.held_bytes / 2**20, gpu_peak_mib=gpu)
            if self.phase == "select":
                res = self._evaluate(seen_split, unseen_split)
                chosen = res.best_metrics if res.best_weights is not None else res.metrics
                weights = res.best_weights if res.best_weights is not None else res.weights
                assert chosen is not None
                if chosen["H"] > self.best.H:  # strict: the earliest epoch wins ties
                    self.best = Best(epoch, chosen["H"], dict(chosen), dict(weights))
                    self.best_state = _to_cpu(unwrap_model(self.model).state_dict())
                report.val, report.val_fitted, report.weights, report.eval_seconds = (
                    res.metrics, res.best_metrics, dict(weights), res.seconds)
            else:
                if epoch == self.epochs:
                    # The only look at the test splits: once, with the final weights, at the given weights.
                    test = self._evaluate(seen_split, unseen_split, fit=False)
                    report.test, report.test_per_class = test.metrics, [tuple(r) for r in test.per_class]
                self.best = Best(epoch, test.metrics["H"] if test else -1.0, dict(test.metrics) if test else None,
                                 self.family.configured_weights(self.cfg))
            report.best = copy.deepcopy(self.best)
            report.epoch_time_s = time.perf_counter() - t0
            self.history.append(report)
            emit(sinks, report, self.state)
        return PhaseResult(self.phase, self.epochs, copy.deepcopy(self.best), list(self.history), self.state(),
                           self.best_state, test)


# ---- the protocol ------------------------------------------------------------------------
def final_config(cfg: RunConfig, best_epoch: int, weights: Mapping[str, float]) -> RunConfig:
    """What the final phase trains after a selection: protocol final, the selected epoch count and
    inference weights, no weight fitting. The training job and sweeps all use it."""
    return cfg.replace(**{"protocol": "final", "optim.epochs": max(1, int(best_epoch)), "eval.fit_weights": False,
                          **{f"eval.{k}": float(v) for k, v in weights.items()}})


@dataclass
class ProtocolResult:
    """A whole protocol: the selection (None for protocol final) and the final phase (None for select)."""

    protocol: str
    selection: Best | None
    select: PhaseResult | None
    final: PhaseResult | None
    final_cfg: RunConfig | None

    @property
    def test_metrics(self) -> dict[str, float] | None:
        return self.final.test.metrics if self.final is not None and self.final.test is not None else None


def run_protocol(cfg: RunConfig, dataset: FeatureDataset, *, sinks: Sequence[Sink] = (),
                 resume: Mapping[str, Any] | None = None, **phase_kw: Any) -> ProtocolResult:
    """cfg.protocol: two_phase (select -> final), select, or final; resumes from a checkpoint dict.

    The final phase's checkpoints carry the selection that produced them ("selection"), so a
    resumed run knows it without re-running the selection.
    """
    selection = Best.from_dict(resume["selection"]) if resume is not None and resume.get("selection") else None
    sel = None
    if cfg.protocol in ("two_phase", "select") and selection is None:
        sel_resume = resume if resume is not None and resume.get("phase") == "select" else None
        sel = run_phase(cfg, dataset, "select", sinks=sinks, resume=sel_resume, **phase_kw)
        selection = sel.best
        resume = None
        if cfg.protocol == "select":
            return ProtocolResult(cfg.protocol, selection, sel, None, None)
    final_cfg = final_config(cfg, selection.epoch, selection.weights) if selection is not None else cfg
    fin_resume = resume if resume is not None and resume.get("phase") == "final" else None
    extra = {"selection": selection.to_dict()} if selection is not None else {}
    fin = run_phase(final_cfg, dataset, "final", sinks=sinks, resume=fin_resume, epochs=final_cfg.optim.epochs,
                    extra_state=extra, **phase_kw)
    return ProtocolResult(cfg.protocol, selection, sel, fin, final_cfg)
