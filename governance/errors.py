"""One base error for every expected failure, with the process exit code the CLI uses.

Exit codes (also in the README):

* 1 - bad input: model, data, configuration, run id, an op without a relevance rule
* 2 - the data broke its contract (or evidence could not be read/verified)
* 3 - a policy refused (gates failed, approval refused)

The command line prints ``error: <message>`` (one line per failure, never a traceback) and exits
with ``exit_code``; the Python API raises the error itself.
"""

from __future__ import annotations

EXIT_INPUT = 1
EXIT_CONTRACT = 2
EXIT_POLICY = 3


class GovernanceError(Exception):
    """An expected failure: the message says what is wrong and how to fix it."""

    exit_code: int = EXIT_INPUT


class InputError(GovernanceError):
    """Bad input: model, data, configuration or arguments (exit 1)."""

    exit_code = EXIT_INPUT


class ContractError(GovernanceError):
    """The data broke its contract (exit 2)."""

    exit_code = EXIT_CONTRACT


class PolicyError(GovernanceError):
    """A policy or gate refused (exit 3)."""

    exit_code = EXIT_POLICY
