"""``mlflow-governance monitor``: explanation drift of one production batch against the audited
explanation, logged as one step of the model version's monitoring run (``governance.drift.monitor``)."""

from __future__ import annotations

import sys

import click


@click.command("monitor")
@click.option("--model-uri", required=True,
              help="The registered version to monitor: models:/<name>@audited or models:/<name>/<version>.")
@click.option("--data", required=True, help="The production batch (parquet/CSV file or folder, artifact URI).")
@click.option("--batch-index", default=None, type=click.IntRange(min=0),
              help="The batch's step in the monitoring run (default: the next one).")
@click.option("--batch-time", default=None, help="When the batch was taken, ISO 8601 (default: now).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="governance.yaml: the drift thresholds (drift.*); the audited run's configuration is the base.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any configuration key, e.g. --set drift.max_js_divergence=0.05. Repeatable.")
@click.option("--experiment-name", default=None,
              help="Experiment of the monitoring run (default: the audited explain run's experiment).")
@click.option("--fail-on-drift", is_flag=True, help="Exit 3 when the batch's verdict is 'changed' (after logging it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def monitor_command(model_uri: str, data: str, batch_index: int | None, batch_time: str | None,
                    config_path: str | None, settings: tuple[str, ...], experiment_name: str | None,
                    fail_on_drift: bool, quiet: bool) -> None:
    """Explain a production batch with the audited model and log its drift; prints the monitoring run id."""
    from mlflow.exceptions import MlflowException

    from governance.config import read_config_file, apply_settings
    from governance.drift.monitor import monitor_batch
    from governance.drift.workflow import DriftInputError
    from governance.errors import PolicyError

    given = apply_settings(read_config_file(config_path), settings)
    try:
        out = monitor_batch(model_uri, data, given=given, batch_index=batch_index, batch_time=batch_time,
                            experiment_name=experiment_name, quiet=quiet)
    except MlflowException as exc:
        raise DriftInputError(f"MLflow: {exc.message}") from exc
    r = out.result
    import os

    from governance import tracking

    outer = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e monitor`: point its run at the monitoring run
    if outer and outer != out.run_id:
        tracking.set_tags(outer, {"monitor_run_id": out.run_id, "monitor_step": str(out.step),
                                  "drift_verdict": r.verdict})
    click.echo(f"batch {out.step}: {r.verdict} (JS divergence {r.overall.js_divergence:.4f}, "
               f"{r.overall.n_significant} significant shift(s)) in {out.timings['total']:.1f}s"
               + (": " + "; ".join(r.reasons) if r.reasons else ""), err=True)
    sys.stdout.flush()
    click.echo(out.run_id)
    if fail_on_drift and out.flagged:
        raise PolicyError(f"batch {out.step} drifted from the audited explanation: {'; '.join(r.reasons)}")
