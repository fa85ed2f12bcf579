"""Ray Tune sweeps of any model family, selected on validation H (Optuna TPE + ASHA).

`space` (search spaces, one per family), `trial` (a trial is the training job's own driver on a
selection run), `sweep` (run, summarise, resume, the MLflow parent/child runs, the final
retrain), `plots` (Figure 3 and the per-parameter scatter). The public names are re-exported here.
"""
from dedn.protocol import SELECTION_SPLITS, TEST_SPLITS
from dedn.tuning.plots import plot_hparams, plot_lambda_curves
from dedn.tuning.space import Dimension, SearchSpace, default_space_path, load_search_space, reported_metrics
from dedn.tuning.sweep import (
    BEST_CONFIG_FILE, SWEEP_FILE, MLflowSweepCallback, SweepInterrupted, SweepSpec, SweepSummary, best_config,
    find_sweep, run_final, run_sweep, summarise_sweep,
)
from dedn.tuning.trial import open_for_selection, trial, trial_config, validation_weight_grid

__all__ = [
    "TEST_SPLITS", "SELECTION_SPLITS", "Dimension", "SearchSpace", "load_search_space", "default_space_path",
    "reported_metrics", "trial", "trial_config", "open_for_selection", "validation_weight_grid", "MLflowSweepCallback",
    "SweepSpec", "SweepSummary", "SweepInterrupted", "run_sweep", "summarise_sweep", "find_sweep", "run_final",
    "best_config", "plot_lambda_curves", "plot_hparams", "BEST_CONFIG_FILE", "SWEEP_FILE",
]
