"""Commands `report`, `card`, `verify` and `approve` (attached to the group in governance/cli/__init__.py)."""

from __future__ import annotations

import os
import sys

import click

# MLflow's download progress bars would flood the terminal of a pipeline step.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _fail(message: str, code: int = 2) -> None:
    """Print an error and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.command("report")
@click.option("--run-id", envvar="MLFLOW_RUN_ID", required=True,
              help="Run holding the explanation artifacts (default: $MLFLOW_RUN_ID).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="governance.yaml whose report/model_card sections override the run's config.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Also write the complete governance/ folder (with manifest) here.")
def report_command(run_id: str, config_path: str | None, output_dir: str | None) -> None:
    """Render the audit report (HTML, PDF) and model card of a run; log them and the manifest."""
    from governance.report import ReportError, publish_report

    try:
        res = publish_report(run_id, config_path=config_path, output_dir=output_dir)
    except ReportError as exc:
        _fail(str(exc))
    for path, digest in sorted(res.files.items()):
        click.echo(f"{digest}  {path}")
    click.echo(f"report {res.report_id}: PDF {res.pdf_bytes:,} bytes, rendered in {res.seconds:.1f} s")
    if res.output_dir:
        click.echo(f"written to {res.output_dir}")
    click.echo(run_id)


@click.command("card")
@click.option("--model-uri", required=True, help="models:/name/version, models:/name@alias, models:/m-<id> or runs:/...")
@click.option("--run-id", default=None, help="Governance run with the explanation results (default: found via the registry).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="governance.yaml with the model_card: section (human-only fields).")
@click.option("--output-dir", type=click.Path(file_okay=False), default="model_card", show_default=True)
def card_command(model_uri: str, run_id: str | None, config_path: str | None, output_dir: str) -> None:
    """Write the model card alone (model_card.md, .json, .html)."""
    from governance.report import ReportError, publish_model_card

    try:
        written = publish_model_card(model_uri, run_id=run_id, config_path=config_path, output_dir=output_dir)
    except ReportError as exc:
        _fail(str(exc))
    for _name, path in sorted(written.items()):
        click.echo(str(path))


@click.command("verify")
@click.option("--run-id", default=None, help="Verify the governance/ artifacts of this run.")
@click.argument("path", required=False, type=click.Path())
def verify_command(run_id: str | None, path: str | None) -> None:
    """Re-check every SHA-256 of governance/manifest.json (a run, a folder, or a .zip/.tar archive).

    Exit 0 only when every file is present and unchanged and none was added; 1 when a file
    changed, is missing or was added (each one named); 2 when nothing could be verified.
    """
    from governance.archive import ArchiveError, verify_path, verify_run

    if (run_id is None) == (path is None):
        _fail("give exactly one of --run-id ID or PATH")
    try:
        result = verify_run(run_id) if run_id else verify_path(path)
    except ArchiveError as exc:
        _fail(str(exc))
    click.echo(result.summary(), err=not result.ok)
    sys.exit(0 if result.ok else 1)


@click.command("approve")
@click.option("--model-name", required=True)
@click.option("--version", "version", required=True)
@click.option("--approver", required=True, help="Name of the person signing off.")
@click.option("--role", required=True, help="Their role, e.g. 'Independent validator'.")
@click.option("--decision", type=click.Choice(["approve", "reject"]), default="approve", show_default=True)
@click.option("--comment", default=None)
def approve_command(model_name: str, version: str, approver: str, role: str, decision: str,
                    comment: str | None) -> None:
    """Record a dated sign-off; set alias `audited` only if the gates passed and verify succeeds."""
    from governance.approval import ApprovalError, ApprovalRefused, approve

    try:
        res = approve(model_name, version, approver, role, decision, comment)
    except ApprovalRefused as exc:
        click.echo(f"refused: {model_name} version {version} cannot be approved:", err=True)
        for reason in exc.reasons:
            click.echo(f"  - {reason}", err=True)
        sys.exit(3)
    except ApprovalError as exc:
        _fail(str(exc))
    click.echo(f"{res.decision} recorded for {model_name} version {res.version} by {approver} ({role}) "
               f"on {res.entry['date']}")
    for note in res.notes:
        click.echo(f"note: {note}")
    if res.alias_set:
        click.echo(f"alias 'audited' -> {model_name} version {res.version}")
    if res.alias_removed:
        click.echo(f"alias 'audited' removed from {model_name} version {res.version}")
