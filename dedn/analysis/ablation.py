"""Ablation studies as named config overrides, one training run each, and their table.

The studies of a family are registered here by family name (`register_ablations`): DEDN's, the
paper's Table 3 and Figure 5, below; a family outside the package registers its own from its
module (`register_ablations("myfamily", SETTINGS)`). Each setting is data: a key, the label the
paper prints and the values it gives to every switch the family's studies turn, so a setting
means the same thing whatever the base configuration says.

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
from dedn.metrics import METRICS, format_pct

__all__ = [
    "Setting", "register_ablations", "family_settings", "switch_keys", "select_settings", "DEDN_FULL", "DEDN_TABLE3",
    "DEDN_FIGURE5", "DEDN_SETTINGS", "setting_config", "check_base_overrides", "AblationResult", "run_ablation",
    "table_rows", "caption", "format_markdown", "format_csv", "write_table", "plot_cluster_study", "METRICS",
]


@dataclass(frozen=True)
class Setting:
    """One ablation setting of a family (DEDN's: a row of Table 3 or a bar of Figure 5): a key, the paper's
    label, the values of the switches it turns."""

    key: str  # identifier used on the command line, in run names and in the CSV
    label: str  # the row label as the paper prints it
    study: str  # "table3" or "figure5"
    changes: tuple[tuple[str, Any], ...] = ()  # departures from FULL, as (dotted key, value)
    description: str = ""

    full: tuple[tuple[str, Any], ...] = ()  # every switch of the family's studies at its full-model value

    @property
    def overrides(self) -> dict[str, Any]:
        """Values of every switch for this setting (`full` with `changes` applied)."""
        return {**dict(self.full), **dict(self.changes)}


_ABLATIONS: dict[str, tuple[Setting, ...]] = {}


def register_ablations(model: str, settings: Sequence[Setting]) -> tuple[Setting, ...]:
    """Make `settings` the studies of family `model`, in table order (registering again replaces them)."""
    keys = [s.key for s in settings]
    if not settings or len(set(keys)) != len(keys):
        raise ConfigError("ablation.settings", "one or more settings with distinct keys", keys, model)
    _ABLATIONS[model] = tuple(settings)
    return _ABLATIONS[model]


def family_settings(model: str = "dedn") -> dict[str, Setting]:
    """{key: Setting} of the studies registered for family `model`, in table order."""
    get_family(model)  # ConfigError naming the known families; loads DEDN_FAMILY_MODULES, which may register studies
    if model not in _ABLATIONS:
        raise ConfigError("model.name", "a model family with registered ablation settings "
                          f"({'|'.join(sorted(_ABLATIONS))})", model, "dedn.analysis.ablation")
    return {s.key: s for s in _ABLATIONS[model]}


def switch_keys(model: str = "dedn") -> tuple[str, ...]:
    """The config keys the family's settings set (users may not override them)."""
    keys = [k for s in family_settings(model).values() for k, _ in s.full + s.changes]
    return tuple(dict.fromkeys(keys))  # each once, in first-seen order (a setting's changes repeat its full keys)


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


# ---- DEDN's studies: the paper's Table 3 and Figure 5 (Rao et al., IJCAI 2024) ----------------
#
# | key | paper's row | what changes |
# |---|---|---|
# | cexp_no_distill | cExp w/o L_distill | model.experts=coarse, loss.distill=false |
# | fexp_no_distill | fExp w/o L_distill | model.experts=fine, loss.distill=false |
# | no_distill | DEDN w/o L_distill | loss.distill=false |
# | no_ca | DAN w/o CA | model.channel_attention=false (both experts) |
# | no_mal | DEDN w/o L_mal | loss.mal=false (plain cross-entropy) |
# | no_align | DAN w/o L_align | loss.align=false |
# | full | DEDN (full) | nothing: manual clusters, every module on |
#
# Figure 5: (a) manual clusters (= `full`) against K-Means clusters of the attribute word vectors
# (`kmeans`, as many clusters as the manual division unless model.num_clusters says otherwise);
# (b) the manual clusters halved (`halved`: consecutive pairs merged, CUB 6 -> 3, SUN/AWA2 4 -> 2).

# The switches DEDN's studies turn, at their full-model values.
DEDN_FULL: dict[str, Any] = {
    "model.experts": "both",
    "model.channel_attention": True,
    "model.clusters": "manual",
    "loss.mal": True,
    "loss.align": True,
    "loss.distill": True,
}


def _dedn(key: str, label: str, study: str, changes: tuple[tuple[str, Any], ...], description: str) -> Setting:
    return Setting(key, label, study, changes, description, full=tuple(DEDN_FULL.items()))


DEDN_TABLE3: tuple[Setting, ...] = (
    _dedn("cexp_no_distill", "cExp w/o L_distill", "table3",
          (("model.experts", "coarse"), ("loss.distill", False)), "coarse expert alone, no distillation"),
    _dedn("fexp_no_distill", "fExp w/o L_distill", "table3",
          (("model.experts", "fine"), ("loss.distill", False)), "fine expert alone, no distillation"),
    _dedn("no_distill", "DEDN w/o L_distill", "table3", (("loss.distill", False),), "both experts, no distillation"),
    _dedn("no_ca", "DAN w/o CA", "table3", (("model.channel_attention", False),),
          "no channel attention in any DAN sub-network"),
    _dedn("no_mal", "DEDN w/o L_mal", "table3", (("loss.mal", False),), "cross-entropy instead of the margin-aware loss"),
    _dedn("no_align", "DAN w/o L_align", "table3", (("loss.align", False),), "no region/channel alignment loss"),
    _dedn("full", "DEDN (full)", "table3", (), "every module on, manual attribute clusters"),
)
DEDN_FIGURE5: tuple[Setting, ...] = (
    # model.cluster_layout=paper: the reference variant's SUN cluster slip exists for the manual clusters only
    _dedn("kmeans", "DEDN, K-Means clusters", "figure5", (("model.clusters", "kmeans"), ("model.cluster_layout", "paper")),
          "Figure 5 (a): attribute clusters by K-Means on the word vectors"),
    _dedn("halved", "DEDN, half clusters", "figure5", (("model.clusters", "halved"), ("model.cluster_layout", "paper")),
          "Figure 5 (b): the manual clusters merged in pairs"),
)
DEDN_SETTINGS = register_ablations("dedn", DEDN_TABLE3 + DEDN_FIGURE5)


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
