"""Commands `report`, `card`, `verify` and `approve` (attached to the group in governance/cli/__init__.py).

Expected failures raise :class:`governance.errors.GovernanceError`; the group prints them as one
``error: ...`` line and exits with their code (1 input, 2 contract / nothing verifiable, 3 policy).
"""

from __future__ import annotations

import os
import sys

import click

# MLflow's download progress bars would flood the terminal of a pipeline step.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_ALLOW_PICKLE = click.option(
    "--allow-pickle", is_flag=True,
    help="When the run recorded no model summary, allow loading a pickled model to summarise it "
         "(loading a pickle runs code it carries).")


@click.command("report")
@click.option("--run-id", envvar="MLFLOW_RUN_ID", required=True,
              help="Run holding the explanation artifacts (default: $MLFLOW_RUN_ID).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="governance.yaml whose report/model_card sections override the run's config.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Also write the complete governance/ folder (with manifest) into this new or empty folder.")
@_ALLOW_PICKLE
def report_command(run_id: str, config_path: str | None, output_dir: str | None, allow_pickle: bool) -> None:
    """Render the audit report (HTML, PDF) and model card of a run; log them and the manifest."""
    from governance.report import publish_report

    res = publish_report(run_id, config_path=config_path, output_dir=output_dir, allow_pickle=allow_pickle)
    for path, digest in sorted(res.files.items()):
        click.echo(f"{digest}  {path}")
    click.echo(f"{res.manifest_sha256}  governance/manifest.json (run tag governance.manifest_sha256)")
    click.echo(f"report {res.report_id}: PDF {res.pdf_bytes:,} bytes, rendered in {res.seconds:.1f} s")
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    if res.output_dir:
        click.echo(f"written to {res.output_dir}")
    click.echo(run_id)


@click.command("card")
@click.option("--model-uri", required=True, help="models:/name/version, models:/name@alias, models:/m-<id> or runs:/...")
@click.option("--run-id", default=None, help="Governance run with the explanation results (default: found via "
              "the registry; for models:/name@audited the approved run).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="governance.yaml with the model_card: section (human-only fields).")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Write the card into this new or empty folder (default: log it to the governance run "
                   "under model_cards/).")
@_ALLOW_PICKLE
def card_command(model_uri: str, run_id: str | None, config_path: str | None, output_dir: str | None,
                 allow_pickle: bool) -> None:
    """Write the model card alone (model_card.md, .json, .html)."""
    from governance.report import publish_model_card

    res = publish_model_card(model_uri, run_id=run_id, config_path=config_path, output_dir=output_dir,
                             allow_pickle=allow_pickle)
    if res.run_id:
        click.echo(f"explanation results from governance run {res.run_id}", err=True)
    if res.artifact_uri:
        click.echo(res.artifact_uri)
    for _name, path in sorted(res.written.items()):
        click.echo(str(path))


@click.command("verify")
@click.option("--run-id", default=None, help="Verify the governance/ artifacts of this run (anchored by its "
              "governance.manifest_sha256 tag).")
@click.option("--expect-sha256", default=None, metavar="HEX",
              help="The manifest's SHA-256 as recorded outside the copy (the run's governance.manifest_sha256 tag).")
@click.argument("path", required=False, type=click.Path())
def verify_command(run_id: str | None, expect_sha256: str | None, path: str | None) -> None:
    """Re-check governance/manifest.json: a run, the governance folder, a folder holding it, its
    manifest.json, or a .zip/.tar archive of either.

    Exit 0 only when every file is present and unchanged, none was added, the manifest is
    consistent and matches its anchor; 1 when something changed, is missing, was added or does
    not match (each one named); 2 when nothing could be verified.
    """
    from governance.archive import ArchiveError, verify_path, verify_run

    if (run_id is None) == (path is None):
        raise ArchiveError("give exactly one of --run-id ID or PATH")
    if run_id and expect_sha256:
        raise ArchiveError("--expect-sha256 is for a PATH; with --run-id the run's tag is the anchor")
    result = verify_run(run_id) if run_id else verify_path(path, expected_sha256=expect_sha256)
    click.echo(result.summary(), err=not result.ok)
    sys.exit(0 if result.ok else 1)


@click.command("approve")
@click.option("--model-name", required=True)
@click.option("--version", "version", required=True)
@click.option("--approver", required=True, help="Name of the person signing off.")
@click.option("--role", required=True, help="Their role, e.g. 'Independent validator'.")
@click.option("--decision", type=click.Choice(["approve", "reject"]), default="approve", show_default=True)
@click.option("--policy", default=None, metavar="FILE|NAME",
              help="The approver's policy: a YAML file, or a packaged policy name such as 'default' (default: "
                   "the policy registered for the model, tag governance.policy).")
@click.option("--comment", default=None)
def approve_command(model_name: str, version: str, approver: str, role: str, decision: str, policy: str | None,
                    comment: str | None) -> None:
    """Record a dated sign-off; set alias `audited` only if the approver's policy passes on verified evidence."""
    from governance.approval import ApprovalRefused, approve

    try:
        res = approve(model_name, version, approver, role, decision, comment, policy=policy)
    except ApprovalRefused as exc:
        click.echo(f"refused: {model_name} version {version} cannot be approved:", err=True)
        for reason in exc.reasons:
            click.echo(f"  - {reason}", err=True)
        sys.exit(exc.exit_code)
    click.echo(f"{res.decision} recorded for {model_name} version {res.version} by {approver} ({role}) "
               f"on {res.entry['date']}")
    if res.policy:
        click.echo(f"policy {res.policy.name} ({res.policy.source}), sha256 {res.policy.sha256}")
    for note in res.notes:
        click.echo(f"note: {note}")
    if res.alias_set:
        click.echo(f"alias 'audited' -> {model_name} version {res.version}")
    if res.alias_removed:
        click.echo(f"alias 'audited' removed from {model_name} version {res.version}")
