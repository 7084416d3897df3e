"""``mlflow-governance explain``: run the explanation stage from the command line.

Every configuration key can be given here: the common ones as options (``--task``,
``--feature-columns``, ``--modes``, ``--primary-mode``...), any other with ``--set key=value``
(repeatable; nested keys with dots; values read as YAML). Options override ``--set``, which
overrides the ``--config`` file.
"""

from __future__ import annotations

import json
import sys

import click

from governance.tasks import MODES, STAGE_TASKS


@click.command("explain")
@click.option("--model-uri", required=True, help="MLflow model URI: runs:/, models:/name/version, "
              "models:/name@alias, models:/m-<id> (PyTorch flavour; pt2, or a pickle with --allow-pickle).")
@click.option("--data", "data", required=True,
              help="Parquet or CSV file, a folder of parquet files (Spark, pyarrow), an artifact URI "
                   "(runs:/, mlflow-artifacts:/, models:/...) or mlflow-dataset:<run-id>/<name>; with --engine spark a "
                   "parquet path or folder (any Hadoop URI) or spark-table:<db.table>.")
@click.option("--target-column", default=None, help="Label column (not a feature).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="governance.yaml; command-line options override it.")
@click.option("--experiment-name", default=None, envvar="MLFLOW_EXPERIMENT_NAME",
              help="Experiment of a new run (when neither --run-id nor MLFLOW_RUN_ID is set).")
@click.option("--run-id", default=None, help="Log into this run (default: MLFLOW_RUN_ID, else a new run).")
@click.option("--task", default=None, type=click.Choice(STAGE_TASKS),
              help="What the model does (default: from the model's metadata, else from its output).")
@click.option("--feature-columns", default=None,
              help="Comma-separated feature columns in the model's input order.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Rows per backtrace batch.")
@click.option("--modes", default=None, help="Comma-separated modes: default,contrastive,signed.")
@click.option("--primary-mode", default=None, type=click.Choice(MODES),
              help="The mode whose results are the headline (default: signed).")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]), help="Where the model runs.")
@click.option("--allow-pickle", is_flag=True, default=None,
              help="Load a model stored as a pickle (runs the code it contains: only for models you trust).")
@click.option("--engine", default=None, type=click.Choice(["local", "spark"]),
              help="Where the stage runs: local (streaming, default) or spark (spark.master, spark.conf "
                   "in the config; --data a parquet path/folder or spark-table:<db.table>).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any configuration key, e.g. --set reason_codes.top_n=3 --set quality.enabled=false "
                   "--set 'inputs.numeric=[a, b]'. Repeatable.")
@click.option("--modality", default=None, help="tabular (default), image or text.")
@click.option("--text-column", default=None, help="Column of the texts (text modality; config text.column).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def explain_command(model_uri: str, data: str, target_column: str | None, config_path: str | None,
                    experiment_name: str | None, run_id: str | None, task: str | None,
                    feature_columns: str | None, batch_size: int | None, modes: str | None,
                    primary_mode: str | None, device: str | None, allow_pickle: bool | None,
                    engine: str | None, settings: tuple[str, ...], modality: str | None, text_column: str | None,
                    quiet: bool) -> None:
    """Explain a model on validation data and log the evidence to MLflow; prints the run id last.

    Exit codes: 0 done, 1 input/model, 2 data contract, 3 policy, 128+N stopped by signal N
    (130 SIGINT, 143 SIGTERM); every failure is one "error: ..." line on stderr."""
    from governance.cli.failures import handled
    from governance.config import config_from_dict, user_settings
    from governance.pipeline import explain_model
    from governance.signals import interruptible
    from governance.tracking import load_model

    # handled here too: the MLproject entry point calls this command without the group
    with handled(), interruptible():
        if text_column is not None:
            settings = (*settings, f"text.column={json.dumps(text_column)}")
        given = user_settings(config_path, settings, target_column=target_column, task=task, modality=modality,
                              feature_columns=feature_columns, batch_size=batch_size, modes=modes,
                              primary_mode=primary_mode, device=device, allow_pickle=allow_pickle,
                              engine=engine)
        cfg = config_from_dict(given)
        handle = load_model(model_uri, device=cfg.device, allow_pickle=cfg.allow_pickle)
        result = explain_model(handle, data, config=given, run_id=run_id, experiment_name=experiment_name,
                               quiet=quiet)
    if not quiet:
        top = result.global_importance["features"][:5]
        click.echo(f"explained {result.n_samples} rows in {result.timings.get('total', 0):.1f}s; "
                   f"top features ({result.global_importance['primary_mode']}): "
                   + ", ".join(f["feature"] for f in top), err=True)
        if result.quality_note:
            click.echo(f"note: {result.quality_note}", err=True)
    sys.stdout.flush()
    click.echo(result.run_id)
