"""MLflow models-from-code entry: the file `dedn.tracking.registry.log_model` passes as `python_model`.

MLflow copies this file into the logged model and runs it on load; it only hands MLflow a
PyfuncModel, whose load_context reads the weights with torch.load(weights_only=True).
No pickled Python object is part of the model.
"""
import mlflow

from dedn.tracking.registry import PyfuncModel

mlflow.models.set_model(PyfuncModel())
