"""How a command ends when something goes wrong: one ``error: ...`` line on stderr and an exit code,
never a traceback unless asked for (``--debug`` or ``MLFLOW_GOVERNANCE_DEBUG=1``).

* :class:`governance.errors.GovernanceError`: its message, its ``exit_code`` (1, 2 or 3).
* :class:`governance.signals.Interrupted` (SIGTERM, SIGINT, SIGHUP while the stage works): what
  happened to the run, exit 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
* An MLflow error (tracking server down, a run that does not exist): ``error: MLflow: ...``, exit 1.
* Anything else is a bug: its type and first line and how to see the traceback, exit 1.

Click's own exceptions (usage errors, ``--help``, exits) pass through untouched.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from typing import Iterator

import click

from governance.errors import EXIT_INPUT, GovernanceError
from governance.signals import Interrupted

DEBUG_ENV = "MLFLOW_GOVERNANCE_DEBUG"


def debug_enabled() -> bool:
    """Whether tracebacks are wanted (``MLFLOW_GOVERNANCE_DEBUG`` set to 1/true/yes)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def failure(exc: BaseException) -> tuple[str, int]:
    """The ``error: ...`` line and the exit code for ``exc``."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, GovernanceError):
        return f"error: {exc}", exc.exit_code
    if isinstance(exc, Interrupted):
        run = f"run {exc.run_id} is tagged governance.status=failed and " if exc.run_id else ""
        return f"error: {exc}, stopped: {run}the staging folders were removed", exc.exit_code
    if isinstance(exc, MlflowException):
        return f"error: MLflow: {_first_line(exc.message) or type(exc).__name__}", EXIT_INPUT
    detail = _first_line(exc)
    return (f"error: unexpected {type(exc).__name__}{': ' + detail if detail else ''} (a bug: rerun with "
            f"--debug or {DEBUG_ENV}=1 for the traceback and report it)", EXIT_INPUT)


@contextmanager
def handled() -> Iterator[None]:
    """Turn a failure inside into its one line on stderr and ``sys.exit(code)``."""
    try:
        yield
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except (Exception, Interrupted) as exc:
        line, code = failure(exc)
        if debug_enabled() and not isinstance(exc, GovernanceError):
            traceback.print_exc()
        sys.stdout.flush()
        click.echo(line, err=True)
        sys.exit(code)
