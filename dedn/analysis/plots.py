"""Training curves of a run: the figure `dedn.tracking.sink.MLflowSink` logs with every run, drawn by
`dedn.tracking.curves` (below the sink, which tracking needs) and named here with the other analyses."""
from dedn.tracking.curves import plot_training_curves

__all__ = ["plot_training_curves"]
