"""mlflow-governance: DLBacktrace explanations of PyTorch models as audit evidence in MLflow."""

__version__ = "0.1.0"
