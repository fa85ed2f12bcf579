"""MLflow models-from-code entry: the file `dedn.registry.log_model` passes as `python_model`.

MLflow copies this file into the logged model and runs it on load; it only hands MLflow a
DEDNPyfuncModel, whose load_context reads the weights with torch.load(weights_only=True).
No pickled Python object is part of the model.
"""
import mlflow

from dedn.registry import DEDNPyfuncModel

mlflow.models.set_model(DEDNPyfuncModel())
