"""Ablation studies as named config overrides, one training run each, and their table.

A model family declares its studies (`ModelFamily.ablations`: `Setting` rows; DEDN's are the
paper's Table 3 and Figure 5, `dedn.families.dedn.ablations`). Each setting is data: a key,
the label the paper prints and the values it gives to every switch the family's studies turn,
so a setting means the same thing whatever the base configuration says.

No Ray, no MLflow here: `run_ablation` takes the function that trains one configuration.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dedn.atomic import save_figure, write_text
from dedn.config import RunConfig, resolve_key
from dedn.errors import ConfigError
from dedn.families import get_family
from dedn.families.base import Setting
from dedn.metrics import METRICS, format_pct

__all__ = [
    "Setting", "family_settings", "switch_keys", "select_settings",
    "setting_config", "check_base_overrides", "AblationResult", "run_ablation", "table_rows", "caption", "format_markdown",
    "format_csv", "write_table", "plot_cluster_study", "METRICS",
]


def family_settings(model: str = "dedn") -> dict[str, Setting]:
    """{key: Setting} of the studies family `model` declares, in table order."""
    rows = get_family(model).ablations
    if not rows:
        raise ConfigError("model.name", "a model family that declares ablation settings", model, "dedn.analysis.ablation")
    return {s.key: s for s in rows}


def switch_keys(model: str = "dedn") -> tuple[str, ...]:
    """The config keys the family's settings set (users may not override them)."""
    keys: list[str] = []
    for s in family_settings(model).values():
        keys += [k for k, _ in s.full + s.changes if k not in keys]
    return tuple(keys)


def select_settings(keys: Iterable[str] | None = None, model: str = "dedn") -> list[Setting]:
    """The settings named by `keys` in table order (all when None/empty); unknown keys raise ConfigError.

    Accepts the study names ("table3", "figure5" for DEDN) as well as single keys.
    """
    settings = family_settings(model)
    studies = sorted({s.study for s in settings.values()})
    wanted: list[str] = []
    for k in keys or ():
        k = k.strip()
        if not k:
            continue
        if k in studies:
            wanted += [s.key for s in settings.values() if s.study == k]
        elif k in settings:
            wanted.append(k)
        else:
            raise ConfigError("ablation.settings", "setting keys from " + "|".join([*settings, *studies]), k)
    if not wanted:
        return list(settings.values())
    return [s for s in settings.values() if s.key in set(wanted)]


def check_base_overrides(overrides: Mapping[str, Any], model: str = "dedn") -> None:
    """Refuse user overrides of the switches the settings set: the table would not say what ran."""
    # resolve_key: the same key resolution as build_config

    switches = switch_keys(model)
    for raw in overrides:
        key = resolve_key(raw, "overrides", model)
        if key in switches:
            raise ConfigError(raw, f"a key the ablation settings do not set (they set {', '.join(switches)})", raw,
                              "overrides")


def setting_config(base: RunConfig, setting: Setting) -> RunConfig:
    """The base configuration with the setting's switch values."""
    return base.replace(**setting.overrides)


# ---- running ----------------------------------------------------------------------------
@dataclass
class AblationResult:
    """The outcome of one setting: test metrics (fractions in [0, 1]) or the error that stopped it."""

    setting: Setting
    metrics: dict[str, float] | None = None  # {"T", "U", "S", "H"} on the test splits
    run_id: str | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.metrics is not None


TrainOne = Callable[[Setting, RunConfig], AblationResult]


def run_ablation(base: RunConfig, settings: Sequence[Setting], train_one: TrainOne, *,
                 on_result: Callable[[AblationResult], None] | None = None, keep_going: bool = True) -> list[AblationResult]:
    """Train every setting in order with `train_one(setting, cfg)`; one result per setting.

    An exception from one setting is recorded in its result (and the next setting runs) when
    `keep_going`, so one failing variant does not cost the others; KeyboardInterrupt stops.
    """
    results: list[AblationResult] = []
    for setting in settings:
        cfg = setting_config(base, setting)
        t0 = time.perf_counter()
        try:
            res = train_one(setting, cfg)
        except Exception as e:  # recorded and reported in the table (re-raised unless keep_going)
            if not keep_going:
                raise
            res = AblationResult(setting, error=f"{type(e).__name__}: {e}")
        res.seconds = res.seconds or time.perf_counter() - t0
        results.append(res)
        if on_result is not None:
            on_result(res)
    return results


# ---- the table ----------------------------------------------------------------------------
def table_rows(results: Sequence[AblationResult]) -> list[dict[str, str]]:
    """One dict per setting: setting, label, T, U, S, H (percent, one decimal; '-' when missing), run_id, error."""
    rows = []
    for r in results:
        m = r.metrics or {}
        rows.append({"setting": r.setting.key, "label": r.setting.label,
                     **{k: format_pct(m.get(k)) for k in METRICS}, "run_id": r.run_id or "", "error": r.error or ""})
    return rows


def caption(dataset: str, semi_synthetic: bool, extra: str = "") -> str:
    """The table's caption; says loudly when the numbers come from semi-synthetic features."""
    text = f"Ablation study on {dataset} (%), test splits, layout of Table 3 and Figure 5 of Rao et al. (IJCAI 2024)."
    if semi_synthetic:
        text += (" **semi-synthetic**: generated feature maps on the real class side;"
                 " not comparable with the paper's numbers.")
    return f"{text} {extra}".strip()


def format_markdown(results: Sequence[AblationResult], dataset: str, *, semi_synthetic: bool, note: str = "") -> str:
    """Markdown table: rows = settings, columns T U S H; the best value of each column in bold."""
    rows = table_rows(results)
    best = {}
    for k in METRICS:
        vals = [r.metrics[k] for r in results if r.ok and r.metrics and math.isfinite(r.metrics.get(k, math.nan))]
        # bold marks the best of a column, as in the paper; a column where every row ties has none
        best[k] = format_pct(max(vals)) if vals and len({format_pct(v) for v in vals}) > 1 else None
    title = f"{dataset} (semi-synthetic)" if semi_synthetic else dataset
    out = [caption(dataset, semi_synthetic, note), "", f"| Setting ({title}) | T | U | S | H |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        cells = [f"**{row[k]}**" if best[k] is not None and row[k] == best[k] else row[k] for k in METRICS]
        label = row["label"] + (f" (failed: {row['error'][:80]})" if row["error"] else "")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def format_csv(results: Sequence[AblationResult], dataset: str, *, semi_synthetic: bool) -> str:
    """CSV with one row per setting: dataset, semi_synthetic, setting, label, T, U, S, H (%), run_id, error."""
    buf = io.StringIO()
    fields_ = ["dataset", "semi_synthetic", "setting", "label", *METRICS, "run_id", "error"]
    w = csv.DictWriter(buf, fieldnames=fields_, lineterminator="\n")
    w.writeheader()
    for row in table_rows(results):
        w.writerow({"dataset": dataset, "semi_synthetic": str(bool(semi_synthetic)).lower(), **row})
    return buf.getvalue()


def write_table(results: Sequence[AblationResult], out_dir: str | os.PathLike[str], dataset: str, *,
                semi_synthetic: bool, stem: str = "ablation", note: str = "") -> dict[str, Path]:
    """Write `<stem>.md` and `<stem>.csv` to out_dir (each to a temp name, then renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "markdown": write_text(out / f"{stem}.md", format_markdown(results, dataset, semi_synthetic=semi_synthetic,
                                                                      note=note)),
        "csv": write_text(out / f"{stem}.csv", format_csv(results, dataset, semi_synthetic=semi_synthetic)),
    }


def plot_cluster_study(results: Sequence[AblationResult], path: str | os.PathLike[str], dataset: str, *,
                       semi_synthetic: bool) -> Path | None:
    """Figure 5 style bars: H and T (%) of manual (= full), K-Means and halved clusters; None if none ran.

    Written as PNG to a temp name, then renamed.
    """
    import matplotlib  # heavy, and the backend is set here, not by an import: only when drawing

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    by_key = {r.setting.key: r for r in results if r.ok}
    labels = {"full": "manual", "kmeans": "K-Means", "halved": "half"}
    shown = [(labels[k], by_key[k].metrics) for k in labels if k in by_key]
    if not shown or not any(k in by_key for k in ("kmeans", "halved")):
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    width = 0.38
    xs = range(len(shown))
    for j, metric in enumerate(("H", "T")):
        vals = [100.0 * m[metric] for _, m in shown]  # type: ignore[index]
        bars = ax.bar([x + (j - 0.5) * width for x in xs], vals, width, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(xs), [name for name, _ in shown])
    ax.set_xlabel("attribute clusters")
    ax.set_ylabel("accuracy on the test splits (%)")
    ax.set_ylim(0, 100)
    ax.legend(title="metric")
    ax.set_title(f"Cluster study, {dataset}" + (" [semi-synthetic data]" if semi_synthetic else ""))
    return save_figure(fig, path)
