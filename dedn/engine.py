"""The training engine: build, train one epoch, evaluate, and the one training loop `run_phase`.

Fixed phases (docs/design.md): setup -> per epoch train_one_epoch -> evaluate -> report ->
cleanup. No training framework, no Ray, no MLflow: the single-process `fit` and the Ray Train
worker (`dedn.distributed`) both call `run_phase`; the worker passes a DDP wrapper, a
`torch.distributed` all-reduce and an `on_epoch_end` that reports to Ray.

Protocol `two_phase`: **select** trains on `train` and evaluates `val_seen` / `val_unseen`
every epoch, keeping the epoch and (lambda_rc, lambda_e) with the best validation H; **final**
retrains on `trainval` from the same seed for that many epochs and evaluates `test_seen` /
`test_unseen` once, at the selected lambdas. The test splits are forbidden during selection.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dedn import msdn
from dedn.checkpoint import CheckpointError, rng_state, set_rng_state
from dedn.class_side import ClassSide
from dedn.config import DEDNConfig
from dedn.dataset import FeatureDataset
from dedn.errors import ConfigError, DednError
from dedn.losses import dedn_loss
from dedn.metrics import ClassAccuracy, GZSLCounts, LambdaSearch
from dedn.model import DEDN, combine_score_parts
from dedn.protocol import PHASES, TEST_SPLITS, ClassProtocol
from dedn.reader import Batch, ShardIterableDataset, ShardReader, forbid_splits

__all__ = [
    "MODELS", "ModelSpec", "model_spec", "unwrap_model", "NonFiniteLossError", "EvalResult", "PhaseResult", "FitResult",
    "build_model", "model_from_state", "build_optimizer", "train_one_epoch", "evaluate", "run_phase", "fit", "final_config", "phase_seed",
]

AllReduce = Callable[[Tensor], Any]  # in-place SUM over ranks (e.g. torch.distributed.all_reduce)


class NonFiniteLossError(DednError, FloatingPointError):
    """The training loss became NaN or infinite; names the epoch, the step and every loss part."""

    def __init__(self, epoch: int, step: int, parts: Mapping[str, float]):
        self.epoch, self.step, self.parts = epoch, step, dict(parts)
        shown = ", ".join(f"{k}={v:.6g}" for k, v in parts.items())
        super().__init__(
            f"epoch {epoch}, step {step}: loss: expected a finite value, found {shown} "
            "(try a lower optim.lr, optim.grad_clip > 0, or check the features for NaN/inf)"
        )


# ---- models ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """How to build one model family and the objective that trains it.

    build(cfg, class_side, feature_shape, clusters) -> nn.Module whose forward returns an output
    (clusters: the attribute clusters a saved model was trained with, or None to derive them);
    with `.score_parts()` ({"P_rc", "P_cc", "P_rf", "P_cf"} subsets, each (B, K));
    loss(out, labels, protocol, cfg.loss, cfg.variant) -> {'loss': total, parts...}.
    """

    build: Callable[[DEDNConfig, ClassSide, tuple[int, int, int], list[list[int]] | None], nn.Module]
    loss: Callable[..., dict[str, Tensor]]


def _build_dedn(cfg: DEDNConfig, class_side: ClassSide, feature_shape: tuple[int, int, int],
                clusters: list[list[int]] | None = None) -> nn.Module:
    if clusters is None:  # only DEDN's fine expert has clusters: resolved (k-means, ...) here, not for every model
        from dedn.clusters import resolve_clusters

        clusters = resolve_clusters(class_side, cfg.model.clusters, cfg.model.num_clusters, cfg.optim.seed)
    return DEDN(cfg.model, word_vectors=torch.from_numpy(np.asarray(class_side.word_vectors, dtype=np.float32)),
                class_attributes=torch.from_numpy(np.asarray(class_side.attributes, dtype=np.float32)),
                clusters=clusters, feature_shape=feature_shape)


# A new model is one module (build + loss), one entry here and its presets/<name>_<dataset>.yaml.
MODELS: dict[str, ModelSpec] = {
    "dedn": ModelSpec(build=_build_dedn, loss=dedn_loss),
    msdn.NAME: ModelSpec(build=msdn.build, loss=msdn.loss),
}


def model_spec(cfg: DEDNConfig) -> ModelSpec:
    """The ModelSpec of cfg.model.name; a ConfigError naming the known models otherwise."""
    if cfg.model.name not in MODELS:
        raise ConfigError("model.name", f"one of {sorted(MODELS)}", cfg.model.name)
    return MODELS[cfg.model.name]


def build_model(cfg: DEDNConfig, class_side: ClassSide, feature_shape: tuple[int, int, int] | list[int]) -> nn.Module:
    """The model named by cfg.model.name, initialised from cfg.optim.seed alone (identical on every rank).

    The global RNG is left as it was: initialisation draws from a forked generator.
    """
    spec = model_spec(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.optim.seed)
        return spec.build(cfg, class_side, tuple(int(x) for x in feature_shape), None)  # type: ignore[arg-type]


def model_from_state(cfg: DEDNConfig, dataset: FeatureDataset, model_state: Mapping[str, Tensor]) -> nn.Module:
    """The network of a checkpoint's model state, built for `dataset`, on CPU."""
    model = build_model(cfg, dataset.class_side, dataset.feature_shape)
    model.load_state_dict(dict(model_state))
    return model


def build_optimizer(cfg: DEDNConfig, model: nn.Module) -> torch.optim.RMSprop:
    """RMSprop on every parameter (the paper's optimiser)."""
    o = cfg.optim
    return torch.optim.RMSprop(model.parameters(), lr=o.lr, alpha=o.alpha, momentum=o.momentum, weight_decay=o.weight_decay)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a DDP (or similar) wrapper; the model itself otherwise."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


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
def train_one_epoch(
    model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer, protocol: ClassProtocol,
    cfg: DEDNConfig, *, device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
    max_steps: int = 0, epoch: int = 0,
) -> dict[str, float]:
    """One pass over `batches` (features (B, C, H, W), labels (B,)); at most `max_steps` steps when > 0.

    Returns the mean of every loss part over the steps, and steps, images, seconds, images_per_s,
    data_wait_frac (fraction of the epoch spent waiting for the next batch). Raises
    NonFiniteLossError on a NaN/inf loss before stepping.
    """
    device = torch.device(device)
    loss_fn = model_spec(cfg).loss
    model.train()
    sums: dict[str, float] = {}
    steps = images = 0
    wait = 0.0
    t_start = time.perf_counter()
    for batch, waited in _timed(batches):
        wait += waited
        x = batch.features.to(device, non_blocking=True)  # (B, C, H, W)
        y = batch.labels.to(device, non_blocking=True)  # (B,)
        with _autocast(device, autocast_dtype):
            out = model(x)
        parts = loss_fn(out, y, protocol, cfg.loss, cfg.variant)
        # One host sync a step: the parts are needed for the means and the finiteness check anyway.
        values = dict(zip(parts, torch.stack([v.detach().float() for v in parts.values()]).tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLossError(epoch, steps + 1, values)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        steps += 1
        images += int(y.shape[0])
        if max_steps and steps >= max_steps:
            break
    seconds = time.perf_counter() - t_start
    stats = {k: v / max(1, steps) for k, v in sums.items()}
    stats.update(steps=float(steps), images=float(images), seconds=seconds,
                 images_per_s=images / seconds if seconds > 0 else 0.0,
                 data_wait_frac=wait / seconds if seconds > 0 else 0.0)
    return stats


@dataclass
class EvalResult:
    """metrics {'T','U','S','H'} at the configured lambdas; the grid's best when searched; per-class rows."""

    metrics: dict[str, float]
    best_lambdas: tuple[float, float] | None
    best_metrics: dict[str, float] | None
    per_class: list[ClassAccuracy]
    lambdas: tuple[float, float]  # the configured (lambda_rc, lambda_e) of `metrics`
    seconds: float = 0.0
    lambda_search: LambdaSearch | None = None  # counts at every grid point, when fitted (Figure 3)


@torch.no_grad()
def evaluate(
    model: nn.Module, seen_batches: Iterable[Batch], unseen_batches: Iterable[Batch], protocol: ClassProtocol,
    cfg: DEDNConfig, *, device: str | torch.device = "cpu", all_reduce: AllReduce | None = None,
    autocast_dtype: torch.dtype | None = None, fit_lambdas: bool | None = None,
) -> EvalResult:
    """GZSL metrics of the model on a seen-side and an unseen-side split.

    Counts at cfg.eval (lambda_rc, lambda_e, calibration), and for every grid point when
    `fit_lambdas` (default cfg.eval.fit_lambdas); `all_reduce` sums each count tensor over ranks
    (every rank then returns the same result). Never fit lambdas on test splits.
    """
    device = torch.device(device)
    ev = cfg.eval
    fit_lambdas = ev.fit_lambdas if fit_lambdas is None else fit_lambdas
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    counts = GZSLCounts(protocol.num_classes)
    search = LambdaSearch(protocol.num_classes, ev.lambda_grid_step, cfg.model.experts,
                          channel_attention=cfg.model.channel_attention, calibration=ev.calibration,
                          prefer=(ev.lambda_rc, ev.lambda_e)) if fit_lambdas else None
    try:
        for side, batches in (("seen", seen_batches), ("unseen", unseen_batches)):
            for batch in batches:
                x = batch.features.to(device, non_blocking=True)  # (B, C, H, W)
                y = batch.labels.to(device, non_blocking=True)
                with _autocast(device, autocast_dtype):
                    out = model(x)
                parts = out.score_parts()  # {name: (B, K)} in float32
                counts.update(combine_score_parts(parts, ev.lambda_rc, ev.lambda_e), y, protocol,
                              side=side, calibration=ev.calibration)  # type: ignore[arg-type]
                if search is not None:
                    search.update(parts, y, protocol, side=side)  # type: ignore[arg-type]
    finally:
        model.train(was_training)
    if all_reduce is not None:
        t = counts.tensor().to(device)
        all_reduce(t)
        counts = GZSLCounts.from_tensor(t.cpu())
        if search is not None:
            s = search.tensor().to(device)
            all_reduce(s)
            search.load_tensor(s.cpu())
    best_l = best_m = None
    if search is not None:
        rc, e, best_m = search.best(protocol)
        best_l = (rc, e)
    return EvalResult(metrics=counts.compute(protocol), best_lambdas=best_l, best_metrics=best_m,
                      per_class=counts.per_class_accuracy(protocol), lambdas=(ev.lambda_rc, ev.lambda_e),
                      seconds=time.perf_counter() - t0, lambda_search=search)


# ---- the training loop -------------------------------------------------------------------
@dataclass
class PhaseResult:
    """What a phase produced.

    select: best_epoch (1-based epochs trained), best_metrics (validation, at `lambdas`),
    lambdas (the best grid point at best_epoch when fit_lambdas, else cfg.eval's), best_state
    (CPU model state_dict of that epoch). final: best_epoch = epochs trained, test (EvalResult).
    Both: history (one dict per epoch), state (the checkpoint dict after the last epoch).
    """

    phase: str
    epochs: int
    best_epoch: int
    best_metrics: dict[str, float] | None
    lambdas: tuple[float, float]
    history: list[dict[str, Any]]
    state: dict[str, Any]
    best_state: dict[str, Tensor] | None = None
    test: EvalResult | None = None


@dataclass
class FitResult:
    """A whole protocol: selection history, chosen epoch and lambdas, test metrics (None for select)."""

    protocol: str
    selection_history: list[dict[str, Any]]
    best_epoch: int
    lambdas: tuple[float, float]
    val_metrics: dict[str, float] | None
    test_metrics: dict[str, float] | None
    test: EvalResult | None = None
    final_history: list[dict[str, Any]] = field(default_factory=list)
    selection: PhaseResult | None = None
    final: PhaseResult | None = None


def phase_seed(seed: int, rank: int) -> int:
    """A torch/numpy/random seed for (seed, rank): runtime randomness differs per rank, reproducibly."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    import random

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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
    """The reader itself, or a DataLoader over it with `workers` processes (pinned memory not needed on CPU)."""
    if workers <= 0:
        return reader
    return torch.utils.data.DataLoader(ShardIterableDataset(reader, workers), batch_size=None, num_workers=workers)


def run_phase(
    cfg: DEDNConfig, dataset: FeatureDataset | str | Path, phase: str, *, rank: int = 0, world_size: int = 1,
    device: str | torch.device = "cpu", wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
    all_reduce: AllReduce | None = None, on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    resume: Mapping[str, Any] | None = None, epochs: int | None = None, autocast_dtype: torch.dtype | None = None,
) -> PhaseResult:
    """Train one phase ("select" or "final"); the only training loop (see module docstring).

    epochs: defaults to cfg.optim.epochs. final evaluates the test splits once, after the last
    epoch, at cfg.eval's lambdas (set them to the selected ones). on_epoch_end(report) gets
    {'phase', 'epoch', 'epochs', 'train', 'val' (select), 'val_best' / 'lambdas' (select),
    'best', 'test' (final, last epoch), 'state': callable -> checkpoint dict}. resume: a
    checkpoint dict of this phase; training continues at its epoch + 1.
    """
    if phase not in PHASES:
        raise ConfigError("phase", f"one of {'|'.join(PHASES)}", phase, "run_phase")
    ds = dataset if isinstance(dataset, FeatureDataset) else FeatureDataset.open(dataset)
    epochs = cfg.optim.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ConfigError("epochs", ">= 1", epochs, "run_phase")
    guard = forbid_splits(TEST_SPLITS) if phase == "select" else nullcontext()
    with guard:
        return _run_phase(cfg, ds, phase, rank, world_size, torch.device(device), wrap_model, all_reduce,
                          on_epoch_end, resume, epochs, autocast_dtype)


def _check_resume(resume: Mapping[str, Any], cfg: DEDNConfig, phase: str, epochs: int) -> int:
    for key in ("model", "optimizer", "epoch", "phase"):
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


def _run_phase(cfg: DEDNConfig, ds: FeatureDataset, phase: str, rank: int, world_size: int, device: torch.device,
               wrap_model: Callable[[nn.Module], nn.Module], all_reduce: AllReduce | None,
               on_epoch_end: Callable[[dict[str, Any]], None] | None, resume: Mapping[str, Any] | None,
               epochs: int, autocast_dtype: torch.dtype | None) -> PhaseResult:
    protocol = ClassProtocol.for_phase(phase, ds.class_side)
    train_split, seen_split, unseen_split = PHASES[phase]
    _seed_everything(phase_seed(cfg.optim.seed, rank))

    # -- setup: model (identical init on every rank), optimiser, readers
    model = build_model(cfg, ds.class_side, ds.feature_shape).to(device)
    optimizer = build_optimizer(cfg, model)
    start, history = 1, []
    best: dict[str, Any] = {"epoch": 0, "H": -1.0, "metrics": None, "lambdas": [cfg.eval.lambda_rc, cfg.eval.lambda_e]}
    best_state: dict[str, Tensor] | None = None
    if resume is not None:
        start = _check_resume(resume, cfg, phase, epochs)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        history = list(resume.get("history", []))
        best = dict(resume.get("best", best))
        best_state = resume.get("best_model")
        if "rng" in resume:
            set_rng_state(resume["rng"])
    wrapped = wrap_model(model)

    o, d = cfg.optim, cfg.data
    train_reader = ShardReader(ds, train_split, batch_size=o.batch_size, shuffle=True, seed=o.seed, rank=rank,
                               world_size=world_size, buffer_rows=d.shuffle_rows(ds.feature_size * np.dtype(ds.storage_dtype).itemsize),
                               class_balanced=d.class_balanced,
                               equal_rows=True)

    def eval_readers(s: str, u: str) -> tuple[ShardReader, ShardReader]:
        return tuple(ShardReader(ds, split, batch_size=cfg.eval.batch_size, shuffle=False, rank=rank,  # type: ignore[return-value]
                                 world_size=world_size, equal_rows=False) for split in (s, u))

    val = eval_readers(seen_split, unseen_split) if phase == "select" else None
    epoch = start - 1

    def state() -> dict[str, Any]:
        st: dict[str, Any] = {
            "model": _to_cpu(unwrap_model(model).state_dict()), "optimizer": _to_cpu(optimizer.state_dict()), "config": cfg.to_dict(),
            "phase": phase, "epoch": epoch, "epochs": epochs, "best": copy.deepcopy(best),
            "history": copy.deepcopy(history), "rng": rng_state(),
        }
        if best_state is not None:
            st["best_model"] = best_state
        return st

    test: EvalResult | None = None
    for epoch in range(start, epochs + 1):
        train_reader.set_epoch(epoch)
        stats = train_one_epoch(wrapped, _loader(train_reader, d.loader_workers), optimizer, protocol, cfg,
                                device=device, autocast_dtype=autocast_dtype, max_steps=o.max_steps_per_epoch, epoch=epoch)
        report: dict[str, Any] = {"phase": phase, "epoch": epoch, "epochs": epochs, "train": stats}
        if val is not None:
            res = evaluate(model, val[0], val[1], protocol, cfg, device=device, all_reduce=all_reduce,
                           autocast_dtype=autocast_dtype)
            chosen = res.best_metrics if res.best_lambdas is not None else res.metrics
            lambdas = list(res.best_lambdas) if res.best_lambdas is not None else [cfg.eval.lambda_rc, cfg.eval.lambda_e]
            assert chosen is not None
            if chosen["H"] > best["H"]:  # strict: the earliest epoch wins ties
                best = {"epoch": epoch, "H": chosen["H"], "metrics": dict(chosen), "lambdas": lambdas}
                best_state = _to_cpu(unwrap_model(model).state_dict())
            report.update(val=res.metrics, val_best=res.best_metrics, lambdas=lambdas, eval_seconds=res.seconds)
        if phase == "final" and epoch == epochs:
            # The only look at the test splits: once, with the final weights, at the given lambdas.
            ts, tu = eval_readers(seen_split, unseen_split)
            test = evaluate(model, ts, tu, protocol, cfg, device=device, all_reduce=all_reduce,
                            autocast_dtype=autocast_dtype, fit_lambdas=False)
            report["test"] = test.metrics
        if phase == "final":
            best = {"epoch": epoch, "H": test.metrics["H"] if test else -1.0,
                    "metrics": dict(test.metrics) if test else None, "lambdas": [cfg.eval.lambda_rc, cfg.eval.lambda_e]}
        report["best"] = copy.deepcopy(best)
        history.append({k: v for k, v in report.items()})
        report["state"] = state
        if on_epoch_end is not None:
            on_epoch_end(report)

    return PhaseResult(phase=phase, epochs=epochs, best_epoch=int(best["epoch"]), best_metrics=best["metrics"],
                       lambdas=(float(best["lambdas"][0]), float(best["lambdas"][1])), history=history,
                       state=state(), best_state=best_state, test=test)


def final_config(cfg: DEDNConfig, best_epoch: int, lambdas: tuple[float, float] | Sequence[float]) -> DEDNConfig:
    """What the final phase trains after a selection: protocol final, the selected epoch count and
    (lambda_rc, lambda_e), no lambda fitting. The training job, `fit` and sweeps all use it."""
    return cfg.replace(**{"protocol": "final", "optim.epochs": max(1, int(best_epoch)), "eval.lambda_rc": float(lambdas[0]),
                          "eval.lambda_e": float(lambdas[1]), "eval.fit_lambdas": False})


def fit(cfg: DEDNConfig, dataset: FeatureDataset | str | Path, *, device: str | torch.device = "cpu",
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        autocast_dtype: torch.dtype | None = None) -> FitResult:
    """Run cfg.protocol in this process: two_phase (select -> final), select, or final."""
    ds = dataset if isinstance(dataset, FeatureDataset) else FeatureDataset.open(dataset)
    kw = dict(device=device, on_epoch_end=on_epoch_end, autocast_dtype=autocast_dtype)
    sel = fin = None
    if cfg.protocol in ("two_phase", "select"):
        sel = run_phase(cfg, ds, "select", **kw)  # type: ignore[arg-type]
        if cfg.protocol == "select":
            return FitResult(cfg.protocol, sel.history, sel.best_epoch, sel.lambdas, sel.best_metrics, None, selection=sel)
        final_cfg = final_config(cfg, sel.best_epoch, sel.lambdas)
        fin = run_phase(final_cfg, ds, "final", epochs=final_cfg.optim.epochs, **kw)  # type: ignore[arg-type]
    else:
        fin = run_phase(cfg, ds, "final", epochs=cfg.optim.epochs, **kw)  # type: ignore[arg-type]
    assert fin.test is not None
    return FitResult(
        protocol=cfg.protocol, selection_history=sel.history if sel else [], best_epoch=fin.epochs,
        lambdas=fin.lambdas, val_metrics=sel.best_metrics if sel else None, test_metrics=fin.test.metrics,
        test=fin.test, final_history=fin.history, selection=sel, final=fin,
    )
