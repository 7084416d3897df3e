"""Entry points `digits` and `reviews`: train the bundled example in a child run (model and
validation data logged there), explain it into this entry point's run with the example's
governance.yaml, then the audit report, model card and manifest (and `verify`)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from importlib import import_module
from pathlib import Path

import _common
import mlflow
from mlflow.tracking import MlflowClient

EXAMPLES = {"digits": "examples.digits.train", "reviews": "examples.reviews.train"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", choices=sorted(EXAMPLES), required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from governance.errors import GovernanceError
    from governance.pipeline import explain_model

    example = import_module(EXAMPLES[a.name])
    config = _common.ROOT / "examples" / a.name / "governance.yaml"
    run_id = os.environ.get("MLFLOW_RUN_ID")
    client = MlflowClient()
    exp_id = client.get_run(run_id).info.experiment_id if run_id else None
    with tempfile.TemporaryDirectory(prefix=f"governance-{a.name}-") as tmp:
        child = client.create_run(exp_id or "0", run_name=f"{a.name}-train",
                                  tags={"mlflow.parentRunId": run_id} if run_id else None)
        with mlflow.start_run(run_id=child.info.run_id):
            out = example.train_and_log(Path(tmp), epochs=a.epochs, seed=a.seed)
        print(f"[{a.name}] trained: {out['model_uri']} (validation accuracy {out['accuracy']:.3f})", flush=True)
        try:
            import yaml

            cfg = yaml.safe_load(config.read_text())
            for key, section in out.get("overrides", {}).items():  # e.g. the tokenizer logged by training
                cfg[key] = {**cfg.get(key, {}), **section}
            from governance.tracking import load_model

            handle = load_model(out["model_uri"], allow_pickle=bool(cfg.get("allow_pickle", False)))
            res = explain_model(handle, out["validation_path"], config=cfg, run_id=run_id, quiet=True)
        except GovernanceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    top = ", ".join(f["feature"] for f in res.global_importance["features"][:5])
    print(f"[{a.name}] explained {res.n_samples} samples; top units: {top}", flush=True)
    from report import report_run

    return report_run(res.run_id, None, None)


if __name__ == "__main__":
    sys.exit(main())
