"""Sweep figures: validation H against each inference weight (the paper's Figure 3) and against each hyper-parameter."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dedn.atomic import save_figure


def plot_lambda_curves(grid: Mapping[str, np.ndarray], weights: Mapping[str, float], path: Path, title: str = "") -> Path:
    """Figure 3 of the paper from a validation grid (`validation_weight_grid`): validation H against each
    inference weight, the other weights held at their best values."""
    import matplotlib  # heavy, and the backend is set here, not by an import: only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    h = np.asarray(grid["H"]).reshape([len(grid[n]) for n in names])
    best_idx = [int(np.argmin(np.abs(np.asarray(grid[n]) - weights[n]))) for n in names]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), constrained_layout=True, squeeze=False)
    for a, (ax, n) in enumerate(zip(axes[0], names)):
        index = tuple(slice(None) if b == a else best_idx[b] for b in range(len(names)))
        xs = np.asarray(grid[n])
        ax.plot(xs, 100 * h[index], marker="o", ms=3, c=f"C{a}")
        ax.axvline(xs[best_idx[a]], ls=":", c="grey")
        others = ", ".join(f"{m} = {np.asarray(grid[m])[best_idx[b]]:.2f}" for b, m in enumerate(names) if b != a)
        ax.set(xlabel=n, ylabel="validation H (%)", title=others)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=120)


def plot_hparams(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], log_keys: Sequence[str], metric: str,
                 path: Path, title: str = "", max_epochs: int | None = None) -> Path:
    """Each trial's best validation H against each searched hyper-parameter (log axes for log-uniform ones).

    With `max_epochs`, a trial that ran fewer epochs (`epochs_run`: ASHA stopped it) is drawn hollow:
    its point is the best of a shorter run, not a finished one.
    """
    import matplotlib  # heavy, and the backend is set here, not by an import: only when drawing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r["params"].get(k), (int, float)) for r in rows)] or list(keys)[:1]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), constrained_layout=True, squeeze=False,
                             sharey=True)
    best = max(r[metric] for r in rows)
    for ax, k in zip(axes[0], keys):
        xs = [r["params"].get(k) for r in rows]
        if k in log_keys:  # log10 on a linear axis: readable ticks also when the trials span < 1 decade
            xs = [math.log10(x) if isinstance(x, (int, float)) and x > 0 else float("nan") for x in xs]
        ys = [100 * r[metric] for r in rows]
        kind = ["best" if r[metric] == best else
                "stopped" if max_epochs is not None and int(r.get("epochs_run", max_epochs)) < max_epochs else "trial"
                for r in rows]
        styles = {"trial": dict(c="C0", s=24, label="trial (best epoch)"),
                  "stopped": dict(facecolors="none", edgecolors="C0", s=24, label="stopped early by ASHA (best epoch)"),
                  "best": dict(c="C3", s=30, label="best validation H")}
        for name, style in styles.items():
            pts = [(x, y) for x, y, kd in zip(xs, ys, kind) if kd == name]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], **style)
        ax.set(xlabel=f"log10({k})" if k in log_keys else k)
    axes[0][0].set_ylabel(f"{metric} (%)")
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=120)
