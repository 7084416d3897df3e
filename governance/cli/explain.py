"""``mlflow-governance explain``: run the explanation stage from the command line."""

from __future__ import annotations

import sys

import click


class StageFailed(click.ClickException):
    """A failure with a clear message and a chosen exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@click.command("explain")
@click.option("--model-uri", required=True, help="MLflow model URI: runs:/, models:/name/version, "
              "models:/name@alias, models:/m-<id> (PyTorch flavour, pt2 or pickle).")
@click.option("--data", "data", required=True, help="Parquet or CSV file, or mlflow-dataset:<run-id>/<name>.")
@click.option("--target-column", default=None, help="Label column (not a feature).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="governance.yaml; command-line options override it.")
@click.option("--experiment-name", default=None, envvar="MLFLOW_EXPERIMENT_NAME",
              help="Experiment of a new run (when neither --run-id nor MLFLOW_RUN_ID is set).")
@click.option("--run-id", default=None, help="Log into this run (default: MLFLOW_RUN_ID, else a new run).")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Rows per backtrace batch.")
@click.option("--modes", default=None, help="Comma-separated modes: default,contrastive,signed.")
@click.option("--primary-mode", default=None, type=click.Choice(["default", "contrastive", "signed"]),
              help="The mode whose results are the headline (default: signed).")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]), help="Where the model runs.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def explain_command(model_uri: str, data: str, target_column: str | None, config_path: str | None,
                    experiment_name: str | None, run_id: str | None, batch_size: int | None,
                    modes: str | None, primary_mode: str | None, device: str | None, quiet: bool) -> None:
    """Explain a model on validation data and log the evidence to MLflow; prints the run id last."""
    from governance.config import ConfigError
    from governance.data import DataLoadError
    from governance.pipeline import StageError, explain_model
    from governance.tracking import ModelLoadError
    from governance.validation import ContractViolation
    from mlflow.exceptions import MlflowException

    try:
        result = explain_model(
            model_uri, data, config=config_path, run_id=run_id, experiment_name=experiment_name,
            quiet=quiet, target_column=target_column, batch_size=batch_size, modes=modes,
            primary_mode=primary_mode, device=device,
        )
    except ContractViolation as exc:
        raise StageFailed(str(exc), exit_code=2) from exc
    except (ModelLoadError, DataLoadError, ConfigError, StageError) as exc:
        raise StageFailed(str(exc), exit_code=1) from exc
    except MlflowException as exc:  # e.g. a --run-id that does not exist
        raise StageFailed(f"MLflow: {exc.message}", exit_code=1) from exc
    if not quiet:
        top = result.global_importance["features"][:5]
        click.echo(f"explained {result.n_samples} rows in {result.timings.get('total', 0):.1f}s; "
                   f"top features ({result.global_importance['primary_mode']}): "
                   + ", ".join(f["feature"] for f in top), err=True)
        if result.quality_note:
            click.echo(f"note: {result.quality_note}", err=True)
    sys.stdout.flush()
    click.echo(result.run_id)
