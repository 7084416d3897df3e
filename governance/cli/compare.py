"""``mlflow-governance compare``: explanation drift between two explanations.

Three forms (``governance.drift.workflow``):

    compare --baseline-run-id A --run-id B                       two explain runs
    compare --baseline-model URI --model-uri URI --data FILE      two models, the same rows (paired)
    compare --model-uri URI --baseline-data FILE --data FILE      one model, two data sets

The result is logged to the comparing run (``--log-run-id``; default: run B when it has no report
yet, else a new run) and its verdict printed; the run id is printed last.
"""

from __future__ import annotations

import sys

import click

USAGE = ("give --baseline-run-id and --run-id (two explain runs), or --baseline-model, --model-uri and --data "
         "(two models on the same rows), or --model-uri, --baseline-data and --data (one model, two data sets)")


def comparison_form(baseline_run_id: str | None, run_id: str | None, baseline_model: str | None,
                    model_uri: str | None, baseline_data: str | None, data: str | None) -> str:
    """``runs``, ``models`` or ``data``: which form the options make (an InputError otherwise)."""
    from governance.drift.workflow import DriftInputError

    given = {k for k, v in (("baseline_run_id", baseline_run_id), ("run_id", run_id),
                            ("baseline_model", baseline_model), ("model_uri", model_uri),
                            ("baseline_data", baseline_data), ("data", data)) if v}
    forms = {"runs": {"baseline_run_id", "run_id"}, "models": {"baseline_model", "model_uri", "data"},
             "data": {"model_uri", "baseline_data", "data"}}
    for name, needed in forms.items():
        if given == needed:
            return name
    raise DriftInputError(f"compare: {USAGE} (got {', '.join(sorted('--' + g.replace('_', '-') for g in given)) or 'none'})")


@click.command("compare")
@click.option("--baseline-run-id", default=None, help="The baseline explain run (with --run-id).")
@click.option("--run-id", default=None, help="The explain run compared with the baseline run.")
@click.option("--baseline-model", default=None, help="The baseline model URI (with --model-uri and --data).")
@click.option("--model-uri", default=None, help="The model compared (or the one model explained on two data sets).")
@click.option("--baseline-data", default=None, help="The baseline data set (with --model-uri and --data).")
@click.option("--data", default=None, help="The data the model(s) are explained on.")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="governance.yaml: the drift thresholds (drift.*) and, for models and data, how to explain.")
@click.option("--target-column", default=None, help="Label column (not a feature).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any configuration key, e.g. --set drift.min_difference=0.02. Repeatable.")
@click.option("--log-run-id", default=None,
              help="Log the comparison into this run (default: run B when it has no report, else a new run).")
@click.option("--experiment-name", default=None, envvar="MLFLOW_EXPERIMENT_NAME",
              help="Experiment of a new comparing run.")
@click.option("--allow-pickle", is_flag=True, default=None, help="Load models stored as a pickle (trusted only).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def compare_command(baseline_run_id: str | None, run_id: str | None, baseline_model: str | None,
                    model_uri: str | None, baseline_data: str | None, data: str | None, config_path: str | None,
                    target_column: str | None, settings: tuple[str, ...], log_run_id: str | None,
                    experiment_name: str | None, allow_pickle: bool | None, quiet: bool) -> None:
    """Compare two explanations: per-unit importance shifts with bootstrap intervals and a verdict."""
    from mlflow.exceptions import MlflowException

    from governance.drift.workflow import DriftInputError

    try:
        _compare(baseline_run_id, run_id, baseline_model, model_uri, baseline_data, data, config_path, target_column,
                 settings, log_run_id, experiment_name, allow_pickle, quiet)
    except MlflowException as exc:  # e.g. a run id that does not exist
        raise DriftInputError(f"MLflow: {exc.message}") from exc


def _compare(baseline_run_id: str | None, run_id: str | None, baseline_model: str | None, model_uri: str | None,
             baseline_data: str | None, data: str | None, config_path: str | None, target_column: str | None,
             settings: tuple[str, ...], log_run_id: str | None, experiment_name: str | None,
             allow_pickle: bool | None, quiet: bool) -> None:
    from governance import tracking
    from governance.config import user_settings
    from governance.drift import workflow

    form = comparison_form(baseline_run_id, run_id, baseline_model, model_uri, baseline_data, data)
    given = user_settings(config_path, settings, target_column=target_column, allow_pickle=allow_pickle)
    if log_run_id:
        tracking.resolve_run(log_run_id, option="--log-run-id")  # a wrong id fails before any work
    if form == "runs":
        result = workflow.compare_runs(baseline_run_id, run_id, given)
    elif form == "models":
        result = workflow.compare_models(baseline_model, model_uri, data, given, quiet=quiet)
    else:
        result = workflow.compare_data(model_uri, baseline_data, data, given, quiet=quiet)
    target, created = log_run_id, False
    if target is None and form == "runs":
        if tracking.run_info(run_id).data.tags.get("governance.report_id"):
            click.echo(f"note: run {run_id} already has a report; the comparison goes to a new run", err=True)
        else:
            target = run_id
    if target is None:
        experiment = tracking.run_info(run_id).info.experiment_id if form == "runs" else None
        if experiment is not None and experiment_name is None:
            target, created = tracking.create_run_in(experiment, "governance-compare"), True
        else:
            target, created = tracking.resolve_run(None, experiment_name, "governance-compare")
    ok = False
    try:
        workflow.log_comparison(result, target)
        ok = True
    finally:
        if created:
            tracking.finish_run(target, ok)
    o = result.overall
    click.echo(f"drift: {result.verdict} ({'paired' if result.paired else 'unpaired'}; JS divergence "
               f"{o.js_divergence:.4f}, top-{o.top_k} overlap {o.top_k_overlap:.2f}, "
               f"{o.n_significant} significant shift(s))" + (": " + "; ".join(result.reasons) if result.reasons else ""),
               err=True)
    sys.stdout.flush()
    click.echo(target)
