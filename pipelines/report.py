"""Entry point `report`: the audit report, model card and manifest of an explanation run
(the `mlflow-governance report` command), then `verify` of what was logged. Everything is logged
into the explanation run; the `main` pipeline calls :func:`report_run` in its own process, so no
run is created for this step."""

from __future__ import annotations

import argparse
import os
import sys

import _common
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from governance.archive import verify_run
from governance.errors import GovernanceError
from governance.report import publish_report


def report_run(run_id: str, config: str | None, output_dir: str | None, own_run: str | None = None) -> int:
    """Report on ``run_id`` and verify it; tag ``own_run`` (the run `mlflow run -e report` made)
    with what it reported on. Returns the exit code."""
    try:
        res = publish_report(run_id, config_path=config, output_dir=output_dir)
    except GovernanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    check = verify_run(run_id)
    print(check.summary())
    if own_run and own_run != run_id:
        MlflowClient().log_batch(own_run, tags=[
            RunTag("governance.reported_run_id", run_id),
            RunTag("governance.report_id", res.report_id),
        ])
    print(f"report {res.report_id}: PDF {res.pdf_bytes:,} bytes in {res.seconds:.1f} s")
    print(run_id)
    return 0 if check.ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-id", required=True, help="The explanation run to report on.")
    p.add_argument("--config", default="")
    p.add_argument("--output-dir", default="")
    a = p.parse_args()
    return report_run(a.run_id, _common.config_path(a.config), _common.opt(a.output_dir),
                      own_run=os.environ.get("MLFLOW_RUN_ID"))


if __name__ == "__main__":
    sys.exit(main())
