"""Side-by-side comparison of model families (DEDN, MSDN, ...) on one dataset: same data, seed and budget.

Each model starts from its own preset for the dataset (`ModelFamily.presets`, i.e. each with its
authors' hyperparameters; the family's defaults where it has none); then the settings that
define the budget are forced equal for all: dataset directory, `optim.seed`, `optim.epochs`,
`optim.max_steps_per_epoch`, `protocol`, plus any user overrides. Every model is trained by the
one training driver (`dedn.training.driver.train`: Ray Train, tracked in MLflow as a child of
the comparison's run when one is given).

The table reports test T, U, S, H (per-class mean top-1, %), training throughput (images/s over
the training epochs of the last phase, evaluation excluded) and the trainable parameter count.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from dedn.atomic import write_text
from dedn.config import RunConfig, apply_overrides, config_for_dataset, parse_overrides
from dedn.data import FeatureDataset
from dedn.errors import ConfigError
from dedn.families import family_names, get_family
from dedn.training.driver import TrainSettings, train
from dedn.training.loop import build_model

__all__ = ["ComparisonRow", "model_config", "compare_models", "to_markdown", "to_csv", "write_table"]


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


def own_overrides(model: str, overrides: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """The overrides that apply to family `model`: plain `key=value` ones apply to every family,
    `family:key=value` ones only to that family (`d3gzsl:model.hidden=1024`)."""
    ov = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    out: dict[str, Any] = {}
    for key, value in ov.items():
        fam, sep, rest = key.partition(":")
        if not sep:
            out[key] = value
            continue
        get_family(fam)  # a misspelt family prefix is a ConfigError, not a silently ignored override
        if fam == model:
            out[rest] = value
    return out


def model_config(model: str, dataset: str, preset: str | None = None, overrides: Mapping[str, Any] | Sequence[str] = (),
                 data_path: str = "") -> RunConfig:
    """The config of family `model` on a dataset: its preset `preset` (default: the dataset's own,
    when the family has one, else the family's defaults named after the dataset), with overrides."""
    get_family(model)  # ConfigError naming model.name and the known families
    ov = own_overrides(model, overrides)
    if preset and preset.lower() not in get_family(model).presets():
        raise ConfigError("preset", f"one of {'|'.join(get_family(model).presets())} (presets of model {model})", preset)
    return config_for_dataset(dataset, data_path, preset, {**ov, "model.name": model})


def _param_count(cfg: RunConfig, ds: FeatureDataset) -> int:
    m = build_model(cfg, ds.class_side, ds.feature_shape)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def compare_models(dataset: FeatureDataset | str | os.PathLike[str], *, preset: str | None = None,
                   models: Sequence[str] | None = None, epochs: int = 1, seed: int = 0, max_steps_per_epoch: int = 0,
                   protocol: str = "final", overrides: Mapping[str, Any] | Sequence[str] = (), settings: Any = None,
                   parent_run_id: str = "") -> list[ComparisonRow]:
    """Train each of `models` (default: every registered family) with the same data, seed and budget.

    One row per model, in order. settings: the driver's TrainSettings (workers, tracking; default
    one worker, no tracking); each model's run is nested under parent_run_id when given.
    """
    if protocol not in ("two_phase", "final"):  # both end with a test evaluation; checked before any training
        raise ConfigError("protocol", "two_phase or final (a test evaluation)", protocol, "dedn.analysis.compare")
    ds = dataset if isinstance(dataset, FeatureDataset) else FeatureDataset.open(dataset)
    models = list(models) if models else list(family_names())
    shared: dict[str, Any] = {
        "optim.epochs": int(epochs), "optim.seed": int(seed), "optim.max_steps_per_epoch": int(max_steps_per_epoch),
        "protocol": protocol,
    }
    user = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    base = settings or TrainSettings(num_workers=1, track=False, register=False, verbose=False)
    # every config first: a bad key or preset fails before any model trains
    cfgs = [apply_overrides(model_config(name, ds.name, preset, user, ds.location), shared, source="dedn.analysis.compare")
            for name in models]
    rows: list[ComparisonRow] = []
    for name, cfg in zip(models, cfgs):
        run_settings = dataclasses.replace(base, register=False, parent_run_id=parent_run_id or base.parent_run_id,
                                           name="", tags={**base.tags, "comparison": ",".join(models)})
        out = train(cfg, run_settings)
        assert out.test_metrics is not None  # two_phase and final both test once
        steps = sum(h.steps for h in out.history)
        images = sum(h.images for h in out.history)
        seconds = sum(h.seconds for h in out.history)
        m = out.test_metrics
        rows.append(ComparisonRow(
            model=name, dataset=ds.name, T=m["T"], U=m["U"], S=m["S"], H=m["H"],
            images_per_s=images / seconds if seconds > 0 else 0.0, parameters=_param_count(cfg, ds),
            epochs=len(out.history), steps=steps, images=images, train_seconds=seconds,
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
