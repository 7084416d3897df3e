"""The `mlflow-governance` command line (click, MLflow-style long options)."""

from __future__ import annotations

import click

from governance import __version__
from governance.errors import GovernanceError


class GovernanceGroup(click.Group):
    """The command group: an expected failure (:class:`GovernanceError`) of any command prints one
    ``error: <message>`` line on stderr and exits with the error's ``exit_code``, never a traceback."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 - whatever the command returns
        try:
            return super().invoke(ctx)
        except GovernanceError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=GovernanceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlflow-governance")
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
