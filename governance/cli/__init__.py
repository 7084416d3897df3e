"""The `mlflow-governance` command line (click, MLflow-style long options)."""

from __future__ import annotations

import os

import click

from governance import __version__
from governance.cli.failures import DEBUG_ENV, handled


class GovernanceGroup(click.Group):
    """The command group: an expected failure (:class:`GovernanceError`) of any command prints one
    ``error: <message>`` line on stderr and exits with the error's ``exit_code``, never a traceback;
    so do an interruption and an unexpected error (``governance.cli.failures``)."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - whatever the command returns
        with handled():
            return super().invoke(ctx)


def _debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        os.environ[DEBUG_ENV] = "1"


@click.group(cls=GovernanceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlflow-governance")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_debug,
              help=f"Print the traceback of an unexpected error (same as {DEBUG_ENV}=1).")
def main() -> None:
    """Explain PyTorch models with DLBacktrace and keep the evidence in MLflow."""


@main.command()
def version() -> None:
    """Print the package version."""
    click.echo(__version__)


from governance.cli.report import approve_command, card_command, report_command, verify_command  # noqa: E402

main.add_command(report_command)
main.add_command(card_command)
main.add_command(verify_command)
main.add_command(approve_command)
from governance.cli.explain import explain_command  # noqa: E402

main.add_command(explain_command)
from governance.cli.compare import compare_command  # noqa: E402
from governance.cli.monitor import monitor_command  # noqa: E402

main.add_command(compare_command)
main.add_command(monitor_command)

if __name__ == "__main__":
    main()
