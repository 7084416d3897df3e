"""What monitoring one production batch costs next to explaining it (issue 13: "monitoring a batch
must cost little more than explaining it"), measured in one run on the credit-risk example.

Three timings per batch size, each the median of ``--repeats`` runs (wall and process CPU seconds):

* ``explain batch``: ``explain_model`` on the batch with the configuration monitoring uses (the
  audited run's, primary mode only, quality off, nothing logged), model loading included;
* ``monitor batch``: ``monitor_batch`` on the same batch (baseline read from the audited run,
  the explanation above, the comparison, logging one step of the monitoring run);
* ``plain explain``: the ``explain`` stage as a user runs it by default (every mode, quality
  metrics, logged to a new run).

It prints the ratios monitor / explain-batch (target: little above 1) and monitor / plain explain.

    .venv/bin/python benchmarks/monitor_cost.py                  # batches of 1,000 and 10,000 rows
    .venv/bin/python benchmarks/monitor_cost.py --rows 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
NAME = "credit-risk-monitor-bench"


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-valid", type=int, default=2000)
    a = p.parse_args()

    import mlflow

    from examples.credit_risk.generator import Standardiser, generate_loans
    from examples.credit_risk.train import train_and_log
    from governance.drift.monitor import monitor_batch
    from governance.drift.workflow import explain_config
    from governance.pipeline import explain_model

    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        exp = client.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
        os.environ["MLFLOW_EXPERIMENT_ID"] = exp
        with mlflow.start_run(experiment_id=exp, run_name="train"):
            out = train_and_log(n_train=5000, n_valid=a.n_valid, epochs=4, seed=0, registered_model_name=NAME,
                                data_dir=root / "data")
        base_cfg = {"target_column": "default", "quality": {"enabled": False}}
        explain_model(f"models:/{NAME}/1", out["validation_path"], config=base_cfg, quiet=True)
        client.set_registered_model_alias(NAME, "audited", "1")
        std = Standardiser.fit(generate_loans(5000, seed=1))
        model_uri = f"models:/{NAME}@audited"
        import yaml

        audited_cfg = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
            run_id=client.get_model_version(NAME, "1").tags["governance.explained_run_id"],
            artifact_path="governance/config.yaml", dst_path=str(root / "cfg"))).read_text())
        mon_cfg = explain_config({k: v for k, v in audited_cfg.items() if k not in ("report", "model_card")})
        print(f"load average at start: {os.getloadavg()[0]:.2f} (the machine may be shared)")
        print(f"{'rows':>7} {'explain batch':>16} {'monitor batch':>16} {'plain explain':>16} "
              f"{'monitor/explain':>16} {'monitor/plain':>14}")
        step = 0
        for n in a.rows:
            batch = root / f"batch_{n}.parquet"
            std.transform(generate_loans(n, seed=900 + n)).to_parquet(batch, index=False)
            times: dict[str, list[tuple[float, float]]] = {"explain": [], "monitor": [], "plain": []}
            for _ in range(a.repeats):
                times["explain"].append(_timed(lambda: explain_model(model_uri, str(batch), config=mon_cfg,
                                                                     log=False, quiet=True)))
                times["monitor"].append(_timed(lambda: monitor_batch(model_uri, str(batch), batch_index=step)))
                step += 1
                times["plain"].append(_timed(lambda: explain_model(model_uri, str(batch),
                                                                   config={"target_column": "default"}, quiet=True)))
            med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}

            def cell(k: str) -> str:
                return f"{med[k][0]:6.2f}s/{med[k][1]:6.2f}cpu"

            print(f"{n:>7} {cell('explain'):>16} {cell('monitor'):>16} {cell('plain'):>16} "
                  f"{med['monitor'][0] / med['explain'][0]:>8.2f} wall/{med['monitor'][1] / med['explain'][1]:.2f} cpu"
                  f" {med['monitor'][0] / med['plain'][0]:>7.2f} wall")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
