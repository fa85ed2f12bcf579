"""The MLflow sink of the training loop: rank 0 logs each epoch's metrics and, after the test, the artifacts."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from dedn.config import RunConfig
from dedn.families import family_of
from dedn.metrics import METRICS
from dedn.tracking.curves import plot_training_curves
from dedn.tracking.names import metric_key
from dedn.tracking.store import RunLogger

__all__ = ["MLflowSink"]


class MLflowSink:
    """Logs `EpochReport.metrics()` with step = epoch, under their MLflow keys (`metric_key`: `val/H`,
    `train/loss`, ...), into an existing run (steps already logged are
    skipped, so a restarted worker group leaves one entry per epoch); after the final phase's test:
    config YAMLs, final_metrics.json, per_class_accuracy.csv and training_curves.png.

    A store that fails (read-only, locked, full, a server gone) raises `TrackingStoreError` from
    `RunLogger`: a non-retryable DednError, so the run ends at once, with one line naming the store."""

    def __init__(self, run_id: str, uri: str | None, cfg: RunConfig, dataset: Any, *, semi_synthetic: bool = False):
        self.logger = RunLogger(run_id, uri)
        self.cfg, self.dataset, self.semi_synthetic = cfg, dataset, semi_synthetic
        self.weight_names = family_of(cfg).weight_names

    def key(self, name: str) -> str:
        return metric_key(name, self.weight_names)

    def on_epoch(self, report: Any, state: Callable[[], dict[str, Any]]) -> None:
        numeric = {self.key(k): v for k, v in report.metrics().items() if k != "epoch" and math.isfinite(v)}
        self.logger.log_metrics(numeric, step=int(report.epoch))
        if report.test:
            self._final_artifacts(report, state())

    def _final_artifacts(self, report: Any, st: Mapping[str, Any]) -> None:
        cfg, log = self.cfg, self.logger
        fam = family_of(cfg)
        final_cfg = RunConfig.from_dict(st["config"], source="final checkpoint")
        selection = st.get("selection")
        log.log_text(cfg.to_yaml(), "config.yaml")
        log.log_text(final_cfg.to_yaml(), "config_final.yaml")
        log.log_dict({
            "dataset": cfg.dataset, "model": cfg.model.name, "variant": cfg.variant, "protocol": cfg.protocol,
            "semi_synthetic": self.semi_synthetic, "data_path": cfg.data.path,
            "best_epoch": selection["epoch"] if selection else None, "weights": fam.configured_weights(final_cfg),
            "val": selection["metrics"] if selection else None, "test": report.test, "final_epochs": report.epochs,
        }, "final_metrics.json")
        names = self.dataset.class_side.class_names
        rows = [{"class_id": r[0], "class_name": names[r[0]], "side": r[1], "t_acc": "" if r[2] is None else f"{r[2]:.6f}",
                 "gzsl_acc": f"{r[3]:.6f}", "n": r[4]} for r in report.test_per_class or []]
        log.log_table_csv(rows, "per_class_accuracy.csv")
        with tempfile.TemporaryDirectory() as d:
            # the select phase's curves when there was one (validation lives there), else the final phase's
            history = self._history_rows(fam.loss_parts, "" if selection else "final_")
            path = plot_training_curves(history, Path(d) / "training_curves.png", loss_keys=fam.loss_parts,
                                        title=fam.describe(cfg), semi_synthetic=self.semi_synthetic)
            log.log_file(path)

    def _history_rows(self, loss_parts: tuple[str, ...], prefix: str) -> list[dict[str, float]]:
        """Per-epoch rows of one phase read back from MLflow (complete even after worker restarts)."""
        rows: dict[int, dict[str, float]] = {}
        for k in [prefix + k for k in loss_parts] + [f"val_{k}" for k in METRICS]:
            for step, value in self.logger.history(self.key(k)):
                rows.setdefault(step, {"epoch": step})[k[len(prefix):] if k.startswith(prefix) else k] = value
        return [rows[s] for s in sorted(rows)]
