"""Entry point `report`: the audit report, model card and manifest of an explanation run
(the `mlflow-governance report` command), then `verify` of what was logged."""

from __future__ import annotations

import argparse
import os
import sys

import _common
from mlflow.tracking import MlflowClient

from governance.archive import verify_run
from governance.report import ReportError, publish_report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-id", required=True, help="The explanation run to report on.")
    p.add_argument("--config", default="")
    p.add_argument("--output-dir", default="")
    a = p.parse_args()
    try:
        res = publish_report(a.run_id, config_path=_common.config_path(a.config),
                             output_dir=_common.opt(a.output_dir))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    check = verify_run(a.run_id)
    print(check.summary())
    own = os.environ.get("MLFLOW_RUN_ID")  # the run `mlflow run` started for this step
    if own and own != a.run_id:
        client = MlflowClient()
        client.set_tag(own, "governance.reported_run_id", a.run_id)
        client.set_tag(own, "governance.report_id", res.report_id)
    print(f"report {res.report_id}: PDF {res.pdf_bytes:,} bytes in {res.seconds:.1f} s")
    print(a.run_id)
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
