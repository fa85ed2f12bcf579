"""The training-curve figure of a run (matplotlib, headless Agg backend): `MLflowSink` logs it with every
run (`training_curves.png`); `dedn.analysis.plots` names it too."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from dedn.atomic import save_figure
from dedn.metrics import METRICS

__all__ = ["plot_training_curves"]

VAL_KEYS = METRICS


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str], *,
                         loss_keys: Sequence[str] = ("loss",), title: str = "", semi_synthetic: bool = False) -> Path:
    """Loss parts (left) and validation T/U/S/H (right) against epoch; written atomically as PNG.

    history: one dict per epoch with "epoch", loss parts (`loss_keys`: the family's loss_parts) and optionally
    "val_T", "val_U", "val_S", "val_H" (fractions in [0, 1]).
    """
    import matplotlib  # heavy (about 0.6 s with pyplot): drawn once, after the test; the sink's import stays light

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [int(h["epoch"]) for h in history]
    # a final-only run (a sweep's --final) validates nothing: one panel, no empty one
    has_val = any(h.get(f"val_{k}") is not None for h in history for k in VAL_KEYS)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(10 if has_val else 5.5, 3.8), constrained_layout=True,
                             squeeze=False)
    ax_l = axes[0][0]
    for key in loss_keys:
        ys = [h.get(key) for h in history]
        if any(y is not None for y in ys):
            ax_l.plot(epochs, [float("nan") if y is None else y for y in ys], marker="o", ms=3,
                      lw=2 if key == "loss" else 1, label=key)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss (mean over the epoch)")
    ax_l.set_yscale("symlog", linthresh=1e-3)
    if ax_l.get_legend_handles_labels()[0]:  # matplotlib warns on a legend without labelled lines
        ax_l.legend(fontsize=8)
    if has_val:
        ax_v = axes[0][1]
        for key in VAL_KEYS:
            ys = [h.get(f"val_{key}") for h in history]
            if any(y is not None for y in ys):
                ax_v.plot(epochs, [float("nan") if y is None else 100 * y for y in ys], marker="o", ms=3, label=key)
        ax_v.set_xlabel("epoch")
        ax_v.set_ylabel("validation accuracy (%)")
        ax_v.set_ylim(0, 100)
        ax_v.legend(fontsize=8)
    fig.suptitle((title + ("  [semi-synthetic data]" if semi_synthetic else "")).strip())
    return save_figure(fig, path)
