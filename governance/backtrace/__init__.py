"""The DLBacktrace engine: relevance from a model's output back to its inputs, op by op.

    from governance.backtrace import Backtrace
    exp = Backtrace(model).explain(x, mode="default", task="multiclass-classification")

The engine knows nothing of MLflow. Rules live in ``rules/``, one module per family of ops;
``register_rule`` adds or replaces one.
"""

from .engine import MODES, Backtrace, infer_task
from .errors import BacktraceError, UnsupportedOperationError
from .explanation import SUMMARY_COLUMNS, Explanation, ModuleBooks
from .registry import register_rule, registered_ops
from .seeding import TASKS

__all__ = [
    "Backtrace", "Explanation", "ModuleBooks", "UnsupportedOperationError", "BacktraceError",
    "register_rule", "registered_ops", "MODES", "TASKS", "SUMMARY_COLUMNS", "infer_task",
]
