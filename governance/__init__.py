"""mlflow-governance: DLBacktrace explanations of PyTorch models as audit evidence in MLflow."""

__version__ = "0.1.0"

__all__ = ["__version__", "explain_model"]


def __getattr__(name: str):
    """Lazy exports: ``governance.explain_model`` without importing torch/MLflow on ``import governance``."""
    if name == "explain_model":
        from governance.pipeline import explain_model

        return explain_model
    raise AttributeError(f"module 'governance' has no attribute {name!r}")
