"""Errors raised by the backtrace engine."""

from __future__ import annotations

from governance.errors import InputError


class BacktraceError(InputError, RuntimeError):
    """Base class of the engine's errors."""


class UnsupportedOperationError(BacktraceError):
    """An op in the captured graph has no relevance rule.

    The message names the ATen op and the module path that produced it, and says how to
    register a rule (``governance.backtrace.register_rule``). The engine never guesses.
    """

    def __init__(self, op: str, module_path: str, detail: str = "") -> None:
        self.op = op
        self.module_path = module_path
        where = module_path if module_path else "<root module>"
        msg = (
            f"no relevance rule for op '{op}' (produced by module '{where}')"
            + (f": {detail}" if detail else "")
            + ". Register one with governance.backtrace.register_rule"
            f"(torch.ops.{op if op.count('.') >= 1 else op}) or replace the op in the model."
        )
        super().__init__(msg)
