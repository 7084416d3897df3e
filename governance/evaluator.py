"""An MLflow evaluator plugin: ``mlflow.models.evaluate(..., evaluators=["governance"])`` runs the
explanation stage on the evaluation data and logs the evidence into the evaluation's run.

Registered under the entry-point group ``mlflow.model_evaluator`` with the name ``governance``.
It is opt-in: it runs only when named (``evaluators="governance"``, ``["governance"]`` or
``["default", "governance"]``). When ``evaluators`` is left out, MLflow asks every registered
evaluator (``resolve_evaluators_and_configs`` in ``mlflow.models.evaluation.base``); this module
filters itself out of that list, so ``evaluate()`` without evaluators behaves exactly as without
the plugin. ``evaluator_config`` takes the keys of ``governance.yaml`` (``modes``,
``primary_mode``, ``batch_size``, ...) plus ``quiet`` (default True).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import pandas as pd
from mlflow.models.evaluation.base import EvaluationResult, ModelEvaluator

NAME = "governance"
_MODEL_TYPES = {None, "classifier", "regressor"}


def _opt_in(resolve: Callable[..., list]) -> Callable[..., list]:
    """``resolve_evaluators_and_configs`` without this evaluator when none were named."""
    if getattr(resolve, "governance_opt_in", False):
        return resolve

    @functools.wraps(resolve)
    def resolve_named_only(evaluators: Any, evaluator_config: Any, model_type: Any = None) -> list:
        bundles = resolve(evaluators, evaluator_config, model_type)
        if evaluators is None:
            bundles = [b for b in bundles if b.name != NAME]
        return bundles

    resolve_named_only.governance_opt_in = True  # type: ignore[attr-defined]
    return resolve_named_only


def install_opt_in(module: Any = None) -> None:
    """Make the plugin opt-in in MLflow's evaluator resolution (idempotent)."""
    if module is None:
        from mlflow.models.evaluation import base as module
    module.resolve_evaluators_and_configs = _opt_in(module.resolve_evaluators_and_configs)


# MLflow imports this module while it registers the evaluator entry points, before any evaluate()
install_opt_in()


class GovernanceEvaluator(ModelEvaluator):
    """Runs :func:`governance.pipeline.explain_model` inside ``mlflow.models.evaluate``."""

    name = NAME

    @classmethod
    def can_evaluate(cls, *, model_type: Any, evaluator_config: dict[str, Any], **kwargs: Any) -> bool:
        """Classifiers and regressors (and an unspecified type); the model is checked in evaluate."""
        return model_type in _MODEL_TYPES

    def evaluate(self, *, model_type: Any, dataset: Any, run_id: str, evaluator_config: dict[str, Any],
                 model: Any = None, extra_metrics: Any = None, custom_artifacts: Any = None,
                 predictions: Any = None, **kwargs: Any) -> EvaluationResult:
        """Explain the PyTorch model behind ``model`` on ``dataset``'s features; log into ``run_id``."""
        from governance.pipeline import explain_model
        from governance.tracking import ModelHandle, model_inputs, read_signature, task_hint

        meta = getattr(model, "metadata", None)
        flavors = getattr(meta, "flavors", None) or {}
        if model is None or "pytorch" not in flavors:
            warnings.warn("the governance evaluator explains PyTorch-flavour models only; skipped", stacklevel=2)
            return EvaluationResult(metrics={}, artifacts={})
        torch_model = model.get_raw_model()
        uri = getattr(meta, "model_uri", None) or f"models:/{getattr(model, 'model_id', None) or 'unknown'}"
        handle = ModelHandle(model=torch_model, uri=str(uri), model_id=getattr(model, "model_id", None),
                             source_run_id=getattr(meta, "run_id", None))
        signature = getattr(meta, "signature", None)
        read_signature(handle, signature)
        handle.inputs = model_inputs(torch_model, signature)
        hint = (model_type, "model_type given to mlflow.models.evaluate") if model_type else task_hint(
            handle, getattr(meta, "metadata", None))
        if hint is not None:
            handle.task_hint, handle.task_hint_source = hint
        features = dataset.features_data
        frame = features if isinstance(features, pd.DataFrame) else pd.DataFrame(
            features, columns=list(dataset.feature_names))
        config = dict(evaluator_config or {})
        quiet = bool(config.pop("quiet", True))
        if model_type == "regressor":  # said by the caller: no inference needed
            config.setdefault("task", "regression")
        if not handle.feature_names:  # a signature with column names gives the order itself
            config.setdefault("feature_columns", [str(c) for c in frame.columns])
        result = explain_model(handle, frame, config=config, run_id=run_id, quiet=quiet)
        return EvaluationResult(metrics=dict(result.metrics), artifacts={})
