"""An MLflow evaluator plugin: ``mlflow.models.evaluate(..., evaluators=["governance"])`` runs the
explanation stage on the evaluation data and logs the evidence into the evaluation's run.

Registered under the entry-point group ``mlflow.model_evaluator`` with the name ``governance``.
It only runs when asked for by name (or when ``evaluators`` is left out and the model is a
PyTorch model): asking for another evaluator never runs it. ``evaluator_config`` takes the
same keys as ``governance.yaml`` (``modes``, ``primary_mode``, ``batch_size``, ...) plus
``quiet`` (default True).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator

_MODEL_TYPES = {None, "classifier", "regressor"}
_TASK_OF = {"classifier": "binary-classification", "regressor": "regression"}


class GovernanceEvaluator(ModelEvaluator):
    """Runs :func:`governance.pipeline.explain_model` inside ``mlflow.models.evaluate``."""

    name = "governance"

    @classmethod
    def can_evaluate(cls, *, model_type: Any, evaluator_config: dict[str, Any], **kwargs: Any) -> bool:
        """Classifiers and regressors (and an unspecified type); the model is checked in evaluate."""
        return model_type in _MODEL_TYPES

    def evaluate(self, *, model_type: Any, dataset: Any, run_id: str, evaluator_config: dict[str, Any],
                 model: Any = None, extra_metrics: Any = None, custom_artifacts: Any = None,
                 predictions: Any = None, **kwargs: Any) -> EvaluationResult:
        """Explain the PyTorch model behind ``model`` on ``dataset``'s features; log into ``run_id``."""
        from governance.pipeline import explain_model
        from governance.tracking import ModelHandle

        import warnings

        flavors = getattr(getattr(model, "metadata", None), "flavors", None) or {}
        if model is None or "pytorch" not in flavors:
            # evaluators=None asks every registered evaluator; never break evaluation of other models
            warnings.warn("the governance evaluator explains PyTorch-flavour models only; skipped", stacklevel=2)
            return EvaluationResult(metrics={}, artifacts={})
        torch_model = model.get_raw_model()
        meta = getattr(model, "metadata", None)
        uri = getattr(meta, "model_uri", None) or f"models:/{getattr(model, 'model_id', None) or 'unknown'}"
        handle = ModelHandle(model=torch_model, uri=str(uri), model_id=getattr(model, "model_id", None),
                             source_run_id=getattr(meta, "run_id", None))
        features = dataset.features_data
        frame = features if isinstance(features, pd.DataFrame) else pd.DataFrame(
            features, columns=list(dataset.feature_names))
        config = dict(evaluator_config or {})
        quiet = bool(config.pop("quiet", True))
        config.setdefault("task", _TASK_OF.get(model_type, "binary-classification"))
        config.setdefault("feature_columns", [str(c) for c in frame.columns])
        result = explain_model(handle, frame, config=config, run_id=run_id, quiet=quiet)
        metrics = {k: v for k, v in result.metrics.items()}
        return EvaluationResult(metrics=metrics, artifacts={})
