"""A plain summary of a PyTorch model's architecture (class, parameter counts per top-level
module) for the report and model card, which never import torch themselves."""

from __future__ import annotations

from typing import Any


def model_summary(model: Any, layer_types: dict[str, str] | None = None) -> dict[str, Any]:
    """{class, n_parameters, n_trainable, layers: [{module, type, parameters}]} of ``model``."""
    layer_types = layer_types or {}
    params: dict[str, int] = {}
    total = trainable = 0
    for name, p in model.named_parameters():
        n = int(p.numel())
        total += n
        trainable += n if p.requires_grad else 0
        top = name.rsplit(".", 1)[0] if "." in name else name
        params[top] = params.get(top, 0) + n
    return {
        "class": type(model).__name__.split(".")[-1].replace("GraphModuleImpl", "GraphModule"),
        "n_parameters": total,
        "n_trainable": trainable,
        "layers": [{"module": m, "type": layer_types.get(m), "parameters": c} for m, c in params.items()],
    }


def logged_model_summary(local_path: str, layer_types: dict[str, str] | None = None) -> dict[str, Any]:
    """The summary of a PyTorch model downloaded from MLflow (loads it with mlflow.pytorch)."""
    import mlflow.pytorch

    return model_summary(mlflow.pytorch.load_model(str(local_path)), layer_types)
