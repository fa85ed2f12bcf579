"""Our results in the layout of Table 1 of Rao et al. (IJCAI 2024): T, U, S, H per dataset.

Three sources in the MLflow store (`dedn.tracking`):

* `registry`: the version behind alias `champion` of `dedn-<dataset>`; its tags hold the
  validation and test metrics (`val_H`, `test_T`, ... as fractions, written by
  `dedn.tracking.registry.register_model`) and the run id;
* `runs`: the finished training runs of experiment `dedn-<dataset>` that reached a test
  evaluation (metric `test/H`), ablation/sweep children excluded; the best is chosen on
  VALIDATION H (`val/best_H`), never on test; runs without validation (protocol final)
  rank after those with it, newest first;
* `seeds`: the newest finished multi-seed reproduction (`jobs/reproduce.py`, a parent run of kind
  "seeds" in experiment `dedn-<dataset>`): the mean of each test metric, shown with its standard
  deviation over the seeds.

Each column group is labelled semi-synthetic when the run's `semi_synthetic` tag is "true".
This module reads MLflow through a client it is given (or `dedn.tracking.client()`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dedn.errors import ConfigError
from dedn.metrics import METRICS, format_pct
from dedn.tracking import store
from dedn.tracking.names import KIND_TAG, PARENT_TAG, SWEEP_TAG, experiment_name, metric_key, registered_name

__all__ = [
    "METRICS", "PAPER_DEDN", "SOURCES", "ResultEntry", "from_registry", "from_runs", "from_seeds", "collect",
    "format_table1",
]

SOURCES = ("registry", "runs", "seeds")
# DEDN's row of Table 1 (%), for comparison; the paper's numbers on real ResNet-101 features.
PAPER_DEDN: dict[str, dict[str, float]] = {
    "CUB": {"T": 77.4, "U": 70.9, "S": 70.0, "H": 70.4},
    "SUN": {"T": 67.4, "U": 54.7, "S": 36.0, "H": 43.5},
    "AWA2": {"T": 75.8, "U": 68.0, "S": 76.5, "H": 72.0},
}
# Tags that mark runs which are not a plain training run of the dataset.
CHILD_TAGS = (PARENT_TAG, KIND_TAG, SWEEP_TAG)
SEMI_TAG = "semi_synthetic"


@dataclass(frozen=True)
class ResultEntry:
    """One dataset's result: test metrics (fractions), where it came from, whether the data was semi-synthetic."""

    dataset: str
    metrics: dict[str, float]  # {"T", "U", "S", "H"} on the test splits, fractions in [0, 1]
    semi_synthetic: bool
    source: str  # "registry" | "runs"
    run_id: str
    model: str  # "dedn-cub/3 (@champion)" or the run name
    variant: str = ""
    val_H: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _client(client: Any | None) -> Any:
    if client is not None:
        return client
    store.init_store()
    return store.client()


def _is_true(v: Any) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes")


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _run_semi(client: Any, run_id: str, fallback: Any) -> bool:
    """The run's semi_synthetic tag (the truth about its data); the version's tag when the run is gone."""
    try:
        tags = client.get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - a deleted run: fall back to the copy on the version
        return _is_true(fallback)
    return _is_true(tags.get(SEMI_TAG, fallback))


def from_registry(dataset: str, client: Any | None = None, alias: str = "champion") -> ResultEntry | None:
    """The `alias` version of `dedn-<dataset>` with its tagged test metrics; None when there is none."""
    from mlflow.exceptions import MlflowException  # mlflow on use (dedn.tracking.store's docstring)

    c = _client(client)
    name = registered_name(dataset)
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    tags = dict(mv.tags or {})
    metrics = {k: _float(tags.get(f"test_{k}")) for k in METRICS}
    if any(v is None for v in metrics.values()):
        raise ConfigError(f"{name}@{alias}", "version tags test_T, test_U, test_S, test_H", sorted(tags), "model registry")
    run_id = tags.get("run_id") or mv.run_id or ""
    return ResultEntry(dataset=dataset.upper(), metrics=metrics, semi_synthetic=_run_semi(c, run_id, tags.get(SEMI_TAG)),  # type: ignore[arg-type]
                       source="registry", run_id=run_id, model=f"{name}/{mv.version} (@{alias})",
                       variant=tags.get("variant", ""), val_H=_float(tags.get("val_H")))


def from_runs(dataset: str, client: Any | None = None, experiment: str | None = None,
              variant: str | None = None) -> ResultEntry | None:
    """The best finished training run of `dataset` by validation H (see module docstring); None when none."""
    c = _client(client)
    exp = c.get_experiment_by_name(experiment or experiment_name(dataset))
    if exp is None:
        return None
    flt = "attributes.status = 'FINISHED'"
    if variant:
        flt += f" and tags.variant = '{variant}'"
    runs, token = [], None
    while True:  # every page: a store with more runs than one page must not lose the best one
        page = c.search_runs([exp.experiment_id], filter_string=flt, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    candidates = []
    for r in runs:
        tags, m = r.data.tags, r.data.metrics
        if any(t in tags for t in CHILD_TAGS):
            continue
        if tags.get("dataset", dataset).upper() != dataset.upper():
            continue
        test = {k: _float(m.get(metric_key(f"test_{k}"))) for k in METRICS}
        if any(v is None for v in test.values()):
            continue
        val_h = _float(m.get(metric_key("best_val_H")))  # its latest value: the selected epoch's
        # validation H first (runs without one last), then the newest
        candidates.append(((val_h is not None, val_h or 0.0, r.info.start_time or 0), r, test, val_h))
    if not candidates:
        return None
    _, best, test, val_h = max(candidates, key=lambda t: t[0])
    tags = best.data.tags
    return ResultEntry(dataset=dataset.upper(), metrics=test, semi_synthetic=_is_true(tags.get(SEMI_TAG)),  # type: ignore[arg-type]
                       source="runs", run_id=best.info.run_id, model=best.info.run_name or best.info.run_id,
                       variant=tags.get("variant", ""), val_H=val_h,
                       extra={"candidates": len(candidates)})


def from_seeds(dataset: str, client: Any | None = None, experiment: str | None = None) -> ResultEntry | None:
    """The newest finished multi-seed parent run of `dataset`: mean test metrics, their spread in `extra`."""
    c = _client(client)
    exp = c.get_experiment_by_name(experiment or experiment_name(dataset))
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"attributes.status = 'FINISHED' and tags.`{KIND_TAG}` = 'seeds'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    m = run.data.metrics
    mean = {k: _float(m.get(f"seeds/test_{k}_mean")) for k in METRICS}
    std = {k: _float(m.get(f"seeds/test_{k}_std")) for k in METRICS}
    if any(v is None for v in (*mean.values(), *std.values())):
        raise ConfigError(f"run {run.info.run_id}", "metrics seeds/test_<T|U|S|H>_mean and _std", sorted(m), "seeds source")
    n = len(str(run.data.params.get("seeds", "")).split(","))
    return ResultEntry(dataset=dataset.upper(), metrics=mean, semi_synthetic=_is_true(run.data.tags.get(SEMI_TAG)),  # type: ignore[arg-type]
                       source="seeds", run_id=run.info.run_id, model=f"{run.info.run_name} ({n} seeds, mean ± std)",
                       variant=str(run.data.params.get("variant", "")), val_H=_float(m.get("seeds/val_H_mean")),
                       extra={"std": std, "seeds": n})


def collect(datasets: Sequence[str], source: str = "registry", client: Any | None = None,
            variant: str | None = None) -> dict[str, ResultEntry | None]:
    """dataset -> its entry (None when the store has nothing for it), in the order given."""
    if source not in SOURCES:
        raise ConfigError("results.source", "one of " + "|".join(SOURCES), source, "collect")
    c = _client(client)
    out: dict[str, ResultEntry | None] = {}
    for ds in datasets:
        if source == "registry":
            out[ds.upper()] = from_registry(ds, c)
        elif source == "runs":
            out[ds.upper()] = from_runs(ds, c, variant=variant)
        else:
            out[ds.upper()] = from_seeds(ds, c)
    return out


def format_table1(entries: Mapping[str, ResultEntry | None], *, include_paper: bool = True,
                  method: str = "DEDN (this code)") -> str:
    """Markdown in Table 1's layout: one column group T U S H per dataset, percentages with one decimal.

    A dataset whose entry is semi-synthetic is marked with a dagger in the header and explained
    below the table; the paper's DEDN row is added for reference when `include_paper`. A list
    of where every number came from follows.
    """
    datasets = list(entries)
    semi = {d for d, e in entries.items() if e is not None and e.semi_synthetic}
    head = ["Method"] + [f"{d}{'†' if d in semi else ''} {k}" for d in datasets for k in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    def cell(e: ResultEntry | None, k: str) -> str:
        if e is None:
            return "-"
        std = e.extra.get("std", {}).get(k) if isinstance(e.extra.get("std"), Mapping) else None
        return format_pct(e.metrics.get(k)) + (f" ± {format_pct(std)}" if std is not None else "")

    ours = [method] + [cell(e, k) for d, e in entries.items() for k in METRICS]
    lines.append("| " + " | ".join(ours) + " |")
    if include_paper:
        paper = ["DEDN (paper, Table 1)"] + [
            f"{PAPER_DEDN[d][k]:.1f}" if d in PAPER_DEDN else "-" for d in datasets for k in METRICS]
        lines.append("| " + " | ".join(paper) + " |")
    out = ["Generalised zero-shot results (%): T = top-1 on unseen classes (ZSL); U, S = unseen/seen accuracy "
           "and H = their harmonic mean (GZSL). Layout of Table 1 of Rao et al. (IJCAI 2024).", "", *lines, ""]
    if semi:
        out.append("† semi-synthetic: generated feature maps on the real class side; these numbers say nothing about "
                   "DEDN on real images and are not comparable with the paper's.")
        out.append("")
    out.append("Sources:")
    for d, e in entries.items():
        if e is None:
            out.append(f"- {d}: nothing in the store")
        else:
            val = f", validation H {format_pct(e.val_H)}" if e.val_H is not None else ""
            out.append(f"- {d}: {e.source} {e.model}, run {e.run_id}, variant {e.variant or '?'}{val}"
                       f"{', semi-synthetic' if e.semi_synthetic else ''}")
    return "\n".join(out) + "\n"


