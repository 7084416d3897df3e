"""Speed and memory of the whole explanation stage on the credit-risk example.

Measures rows/s of ``explain_model`` (data contract + backtrace in every mode + aggregation +
plots + MLflow logging; imports done beforehand, quality metrics off) on N validation rows, the
same rows' plain batched inference (``torch.no_grad``, same batch size) and the ratio of the two,
and the process's peak RSS. Each size runs in a fresh process, so peak memory across sizes shows
whether memory stays flat in the number of rows.

    .venv/bin/python benchmarks/explain_stage.py                 # 25k, 50k, 100k rows
    .venv/bin/python benchmarks/explain_stage.py --rows 100000 --modes signed
    .venv/bin/python benchmarks/explain_stage.py --rows 100000 --cpu-threads 1 0   # 1 vs default threads
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
TARGET_ROWS_PER_S = 20000


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prepare(workdir: Path, rows: int, n_train: int, epochs: int) -> dict:
    """Train and log the example model; write ``rows`` validation rows as parquet."""
    import mlflow

    from examples.credit_risk.generator import Standardiser, generate_loans
    from examples.credit_risk.train import train_and_log

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.MlflowClient().create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        out = train_and_log(n_train=n_train, n_valid=1000, epochs=epochs, data_dir=workdir / "train")
    train = generate_loans(n_train, seed=1)
    big = Standardiser.fit(train).transform(generate_loans(rows, seed=7))
    big.to_parquet(workdir / "valid.parquet", index=False)
    return {"tracking_uri": uri, "experiment_id": exp, "model_uri": out["runs_uri"]}


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    import mlflow
    import numpy as np
    import pandas as pd
    import torch

    import governance.plots  # noqa: F401  (imports are not part of the stage's time)
    import governance.validation as gv
    from governance.pipeline import explain_model
    from governance.tracking import load_model

    ctx = json.loads(args.context)
    mlflow.set_tracking_uri(ctx["tracking_uri"])
    # warm-up outside the timing: lazy imports of GX, torch.export's deserialiser, matplotlib fonts
    gv._gx_context()
    load_model(ctx["model_uri"])
    governance.plots.importance_bar(
        pd.DataFrame({"feature": ["a"], "importance": [1.0], "signed": [1.0], "ci_low": [1.0],
                      "ci_high": [1.0], "rank": [1]}), Path(args.workdir) / "warmup.png", title="warm-up")
    os.environ["MLFLOW_EXPERIMENT_ID"] = ctx["experiment_id"]
    data = Path(args.workdir) / f"valid_{args.rows}.parquet"
    frame = pd.read_parquet(Path(args.workdir) / "valid.parquet").head(args.rows)
    frame.to_parquet(data, index=False)
    del frame
    rss_before = _peak_rss_mb()
    threads = args.cpu_threads[0] or None
    config = {"quality": {"enabled": False}, "batch_size": args.batch_size, "modes": args.modes.split(","),
              "cpu_threads": threads,
              "primary_mode": args.modes.split(",")[0] if "signed" not in args.modes else "signed"}
    t = time.perf_counter()
    res = explain_model(ctx["model_uri"], data, target_column="default", config=config, quiet=True)
    stage_s = time.perf_counter() - t
    rss_stage = _peak_rss_mb()

    model = load_model(ctx["model_uri"]).model
    x = torch.from_numpy(np.ascontiguousarray(pd.read_parquet(data).drop(columns=["default"]).to_numpy(np.float32)))
    if threads:
        torch.set_num_threads(threads)
    with torch.no_grad():
        model(x[: args.batch_size])
        t = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            model(x[i:i + args.batch_size])
        infer_s = time.perf_counter() - t
    print(json.dumps({
        "rows": args.rows, "modes": args.modes, "batch_size": args.batch_size,
        "stage_s": stage_s, "stage_rows_per_s": args.rows / stage_s,
        "inference_rows_per_s": args.rows / infer_s, "ratio_to_inference": infer_s / stage_s,
        "peak_rss_mb_before_stage": rss_before, "peak_rss_mb": rss_stage,
        "steps_s": {k: round(v, 3) for k, v in res.timings.items()},
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="*", default=[25000, 50000, 100000])
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--modes", default="signed,default,contrastive")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--cpu-threads", type=int, nargs="*", default=[1],
                   help="torch intra-op threads for the stage and the inference (0 = torch's default).")
    p.add_argument("--json", default=None, help="Also write the results to this file.")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--context", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.rows = args.rows[0]
        child(args)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        work = Path(tmp)
        ctx = prepare(work, max(args.rows), args.n_train, args.epochs)
        for threads, n in [(t, n) for t in args.cpu_threads for n in args.rows]:
            cmd = [sys.executable, __file__, "--child", "--rows", str(n), "--batch-size", str(args.batch_size),
                   "--modes", args.modes, "--context", json.dumps(ctx), "--workdir", str(work),
                   "--cpu-threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"benchmark child for {n} rows failed")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"threads {res['torch_threads']} | {n:>7} rows | stage {res['stage_rows_per_s']:>9,.0f} rows/s ({res['stage_s']:.1f} s) | "
                  f"inference {res['inference_rows_per_s']:>11,.0f} rows/s | ratio {res['ratio_to_inference']:.4f} | "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB | steps {res['steps_s']}", flush=True)
    best = max((r for r in results if r["rows"] == max(args.rows)), key=lambda r: r["stage_rows_per_s"])
    verdict = "meets" if best["stage_rows_per_s"] >= TARGET_ROWS_PER_S else "misses"
    print(f"target {TARGET_ROWS_PER_S:,} rows/s: {verdict} it at {best['rows']:,} rows "
          f"({best['stage_rows_per_s']:,.0f} rows/s, modes {args.modes})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
