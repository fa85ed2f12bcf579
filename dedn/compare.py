"""Side-by-side comparison of model families (DEDN, MSDN) on one dataset: same data, seed and budget.

Each model starts from its own preset (DEDN: `dedn/presets/<dataset>.yaml`, MSDN:
`dedn/presets/msdn_<dataset>.yaml`, i.e. each with its authors' hyperparameters); then the
settings that define the budget are forced equal for both: dataset directory, `optim.seed`,
`optim.epochs`, `optim.max_steps_per_epoch`, `protocol`, plus any user overrides. Both are
trained by the same `dedn.engine.fit` (same reader, same evaluation, same metrics).

The table reports test T, U, S, H (per-class mean top-1, %), training throughput (images/s over
every training epoch of the run, evaluation excluded) and the trainable parameter count.
No MLflow here: `jobs/compare.py` logs the table.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from dedn import engine
from dedn.atomic import write_text
from dedn.config import DEDNConfig, apply_overrides, build_config, parse_overrides
from dedn.dataset import FeatureDataset
from dedn.errors import ConfigError

__all__ = ["COMPARABLE_MODELS", "ComparisonRow", "model_config", "compare_models",
           "to_markdown", "to_csv", "write_table"]

COMPARABLE_MODELS = tuple(engine.MODELS)  # every registered model family


@dataclass(frozen=True)
class ComparisonRow:
    """One model's line: test metrics in [0, 1], training throughput, size and the budget it had."""

    model: str
    dataset: str
    T: float
    U: float
    S: float
    H: float
    images_per_s: float
    parameters: int
    epochs: int
    steps: int
    images: int
    train_seconds: float
    batch_size: int
    seed: int
    protocol: str


def model_config(model: str, preset: str, overrides: Mapping[str, Any] | Sequence[str] = ()) -> DEDNConfig:
    """The preset config of `model` ("dedn" | "msdn") on dataset preset "cub" | "sun" | "awa2", with overrides."""
    if model not in COMPARABLE_MODELS:
        raise ConfigError("model", "one of " + "|".join(COMPARABLE_MODELS), model, "dedn.compare")
    ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    return build_config(preset, {**ov, "model.name": model})


def _param_count(cfg: DEDNConfig, ds: FeatureDataset) -> int:
    m = engine.build_model(cfg, ds.class_side, ds.feature_shape)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _throughput(history: Sequence[Mapping[str, Any]]) -> tuple[int, int, float]:
    steps = images = 0
    seconds = 0.0
    for h in history:
        t = h.get("train", {})
        steps += int(t.get("steps", 0))
        images += int(t.get("images", 0))
        seconds += float(t.get("seconds", 0.0))
    return steps, images, seconds


def compare_models(
    dataset: FeatureDataset | str | os.PathLike[str], *, preset: str | None = None,
    models: Sequence[str] = COMPARABLE_MODELS, epochs: int = 1, seed: int = 0, max_steps_per_epoch: int = 0,
    protocol: str = "final", overrides: Mapping[str, Any] | Sequence[str] = (), device: str = "cpu",
    on_epoch_end: Any = None,
) -> list[ComparisonRow]:
    """Train each of `models` with the same data, seed and budget; one row per model, in order.

    preset: dataset preset ("cub" | "sun" | "awa2"); default the dataset's name. overrides apply
    to every model after the shared budget (same keys as the command line).
    on_epoch_end(model, report) is called after every epoch (progress).
    """
    if protocol not in ("two_phase", "final"):  # both end with a test evaluation; checked before any training
        raise ConfigError("protocol", "two_phase or final (a test evaluation)", protocol, "dedn.compare")
    ds = dataset if isinstance(dataset, FeatureDataset) else FeatureDataset.open(dataset)
    preset = (preset or ds.name).lower()
    shared: dict[str, Any] = {
        "optim.epochs": int(epochs), "optim.seed": int(seed), "optim.max_steps_per_epoch": int(max_steps_per_epoch),
        "protocol": protocol, "data.path": str(ds.root),
    }
    user = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    rows: list[ComparisonRow] = []
    for name in models:
        cfg = apply_overrides(model_config(name, preset, user), shared, source="dedn.compare")  # the budget wins
        cb = None if on_epoch_end is None else (lambda report, _n=name: on_epoch_end(_n, report))
        res = engine.fit(cfg, ds, device=device, on_epoch_end=cb)
        assert res.test_metrics is not None  # two_phase and final both test once
        steps, images, seconds = _throughput(res.selection_history + res.final_history)
        m = res.test_metrics
        rows.append(ComparisonRow(
            model=name, dataset=ds.name, T=m["T"], U=m["U"], S=m["S"], H=m["H"],
            images_per_s=images / seconds if seconds > 0 else 0.0, parameters=_param_count(cfg, ds),
            epochs=res.best_epoch, steps=steps, images=images, train_seconds=seconds,
            batch_size=cfg.optim.batch_size, seed=cfg.optim.seed, protocol=cfg.protocol,
        ))
    return rows


_HEAD = ("model", "T", "U", "S", "H", "images/s", "parameters", "epochs", "steps", "batch")


def to_markdown(rows: Sequence[ComparisonRow], *, title: str = "") -> str:
    """A Markdown table: T, U, S, H in %, images/s, parameters and the budget."""
    lines = [f"{title}\n" if title else ""]
    lines.append("| " + " | ".join(_HEAD) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(_HEAD) - 1)) + "|")
    for r in rows:
        lines.append(f"| {r.model} | {100 * r.T:.1f} | {100 * r.U:.1f} | {100 * r.S:.1f} | {100 * r.H:.1f} | "
                     f"{r.images_per_s:.1f} | {r.parameters:,} | {r.epochs} | {r.steps} | {r.batch_size} |")
    return "\n".join(line for line in lines if line) + "\n"


def to_csv(rows: Sequence[ComparisonRow]) -> str:
    """Every ComparisonRow field, metrics as fractions in [0, 1]."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(ComparisonRow)], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(asdict(r))
    return buf.getvalue()


def write_table(rows: Sequence[ComparisonRow], out_dir: str | os.PathLike[str], *, title: str = "") -> tuple[Path, Path]:
    """compare.md and compare.csv in out_dir, each written to a temporary name and renamed."""
    out = Path(out_dir)
    return write_text(out / "compare.md", to_markdown(rows, title=title)), write_text(out / "compare.csv", to_csv(rows))
