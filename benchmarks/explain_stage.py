"""Speed and memory of the whole explanation stage on the credit-risk example, streamed.

For each size N: rows/s of ``explain_model`` (data contract + backtrace in every mode +
aggregation + writers + plots + MLflow logging; imports and warm-ups done beforehand, quality
metrics off) on an N-row parquet file, the same rows' plain batched inference (``torch.no_grad``,
same batch size), the ratio of the two, and the process's peak RSS. Each size runs in a fresh
process that never holds the table, so peak RSS across sizes shows whether memory stays flat in
the number of rows (target: the largest size within 10% of the smallest). The files are written
with pandas' defaults (row groups of up to 1M rows: the reader must not hold a row group).

Per size it also prints where the time goes, measured in the same run: wall seconds per phase,
and CPU microseconds per row of each step of the streaming runner, each measured in the thread
that runs it (``time.thread_time``): ``read`` (the reader thread), ``backtrace`` (the main
thread: the engine in every mode, units, shares, layer books, reason codes), ``aggregate`` and
``write`` (the fold thread: the state's accumulators; the per-sample parquet files), ``contract``
(the data contract's thread), ``other`` (the process's CPU during the stream that no step's
clock sees: thread hand-offs, pyarrow's own threads) and ``fixed`` (the process's CPU outside
the stream: loading, documents, plots, logging). The steps overlap, so the stage's rows/s are given both per wall
second and per CPU second (all threads), with the load average before and after (the machine
may be shared: a loaded machine stretches the wall time, not the CPU time much). The
``projected`` rows/s is what the same CPU seconds give on an idle machine with ``--cores``
cores: the stream takes the longer of the main thread's CPU and the streaming steps' CPU over
the cores, and the fixed part runs on one core after it (an estimate: CPU seconds measured on a
loaded machine run somewhat long, and overlap is never perfect).

    .venv/bin/python benchmarks/explain_stage.py                       # 100k, 400k, 1.6M rows
    .venv/bin/python benchmarks/explain_stage.py --rows 100000 --modes signed
    .venv/bin/python benchmarks/explain_stage.py --rows 100000 --cpu-threads 1 0   # 1 vs default threads
    .venv/bin/python benchmarks/explain_stage.py --rows 100000 --spark-rows 100000  # + Spark local[2]
    .venv/bin/python benchmarks/explain_stage.py --rows 1000000 --profile            # + cProfile's top
    .venv/bin/python benchmarks/explain_stage.py --modality image text    # images/s, tokens/s (examples)
    .venv/bin/python benchmarks/explain_stage.py --modality text-quality  # reviews' bounded quality vs the stage

``--spark-rows`` also runs the Spark engine (``governance.stage.spark``) on ``--spark-master``
(default ``local[2]``) at those sizes, in a fresh process each (session start not timed), and
prints its rows/s beside the streaming path's at the same size (the ratio measured in one run).
``--profile`` runs the streaming stage under cProfile and prints the functions with the most
own time (the profiler slows the stage down; the rows/s of such a run are not the figures).
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
TARGET_ROWS_PER_S = 50000
FLAT_WITHIN = 0.10
PHASES = ("read", "backtrace", "aggregate", "write", "contract_wait", "documents", "logging")
STREAM_STEPS = ("read", "backtrace", "aggregate", "write")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def prepare(workdir: Path, sizes: list[int], n_train: int, epochs: int, chunk: int = 100_000) -> dict:
    """Train and log the example model; write one validation parquet file per size, generated
    and written chunk by chunk (the parent never holds a large table either)."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    from examples.credit_risk.generator import Standardiser, generate_loans
    from examples.credit_risk.train import train_and_log

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.MlflowClient().create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        out = train_and_log(n_train=n_train, n_valid=1000, epochs=epochs, data_dir=workdir / "train")
    std = Standardiser.fit(generate_loans(n_train, seed=1))
    files = {}
    for n in sizes:
        path = workdir / f"valid_{n}.parquet"
        writer = None
        for i, start in enumerate(range(0, n, chunk)):
            part = std.transform(generate_loans(min(chunk, n - start), seed=7 + i))
            table = pa.Table.from_pandas(part, preserve_index=False)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=1 << 20)
        writer.close()
        files[str(n)] = str(path)
    return {"tracking_uri": uri, "experiment_id": exp, "model_uri": out["runs_uri"], "files": files}


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    import mlflow
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
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
    data = Path(ctx["files"][str(args.rows)])
    threads = args.cpu_threads[0] or None
    modes = args.modes.split(",")
    config = {"quality": {"enabled": False}, "batch_size": args.batch_size, "modes": modes, "cpu_threads": threads,
              "primary_mode": "signed" if "signed" in modes else modes[0]}
    if args.engine == "spark":
        from pyspark.sql import SparkSession

        session = SparkSession.builder.master(args.spark_master).config("spark.ui.enabled", "false").getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
        config["engine"] = "spark"
    rss_before = _peak_rss_mb()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    load_before = os.getloadavg()
    t, cpu = time.perf_counter(), time.process_time()
    res = explain_model(ctx["model_uri"], str(data), target_column="default", config=config, quiet=True)
    stage_s, stage_cpu = time.perf_counter() - t, time.process_time() - cpu
    load_after = os.getloadavg()
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        sys.stderr.write(buf.getvalue())
    rss_stage = _peak_rss_mb()
    del res.state

    model = load_model(ctx["model_uri"]).model
    if threads:
        torch.set_num_threads(threads)
    infer_s = 0.0
    with torch.no_grad():
        for batch in pq.ParquetFile(data).iter_batches(batch_size=args.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch.to_pandas().drop(columns=["default"]).to_numpy(np.float32)))
            t = time.perf_counter()
            model(x)
            infer_s += time.perf_counter() - t
    tm = res.timings
    if args.engine == "spark":
        session.stop()
    steps = {k: tm.get(f"{k}_cpu", 0.0) for k in STREAM_STEPS}
    steps["contract"] = tm.get("contract_cpu", 0.0)
    # the whole process's CPU while the stream ran: the steps, and what no step's clock sees
    # (thread hand-offs, pyarrow's own threads)
    stream_cpu = max(tm.get("stream_process_cpu", 0.0), sum(steps.values()))
    steps["other"] = stream_cpu - sum(steps.values())
    fixed_cpu = max(stage_cpu - stream_cpu, 0.0)
    projected_s = max(steps["backtrace"], stream_cpu / args.cores) + fixed_cpu
    print(json.dumps({
        "engine": args.engine, "rows": args.rows, "modes": args.modes, "batch_size": args.batch_size,
        "stage_s": stage_s, "stage_cpu_s": stage_cpu, "stage_rows_per_s": args.rows / stage_s,
        "inference_rows_per_s": args.rows / infer_s, "ratio_to_inference": infer_s / stage_s,
        "peak_rss_mb_before_stage": rss_before, "peak_rss_mb": rss_stage,
        "steps_s": {k: round(v, 3) for k, v in tm.items()},
        "cpu_us_per_row": {k: round(tm.get(f"{k}_cpu", 0.0) / args.rows * 1e6, 2) for k in PHASES
                           if f"{k}_cpu" in tm},
        "contract_cpu_us_per_row": round(tm.get("contract_cpu", 0.0) / args.rows * 1e6, 2),
        "step_cpu_us_per_row": {k: round(v / args.rows * 1e6, 2) for k, v in
                                {**steps, "fixed": fixed_cpu}.items()},
        "fixed_cpu_s": fixed_cpu, "stage_rows_per_cpu_s": args.rows / stage_cpu,
        "projected_rows_per_s": args.rows / projected_s, "cores": args.cores,
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "load_before": load_before, "load_after": load_after,
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="*", default=[100_000, 400_000, 1_600_000])
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--modes", default="signed,default,contrastive")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--cpu-threads", type=int, nargs="*", default=[1],
                   help="torch intra-op threads for the stage and the inference (0 = torch's default).")
    p.add_argument("--spark-rows", type=int, nargs="*", default=[],
                   help="Also run the Spark engine at these sizes (see the module docstring).")
    p.add_argument("--spark-master", default="local[2]")
    p.add_argument("--profile", action="store_true", help="cProfile the streaming stage (see the docstring).")
    p.add_argument("--cores", type=int, default=2, help="Cores of the idle machine the projection is for.")
    p.add_argument("--engine", default="local", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="Also write the results to this file.")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--context", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    p.add_argument("--modality", nargs="*", choices=["image", "text", "text-quality"], default=None,
                   help="Measure the digits (images/s) and/or reviews (tokens/s) examples instead.")
    args = p.parse_args()
    if args.modality:
        from benchmarks.modality_speed import report, run

        modes = [m for m in args.modes.split(",") if m]
        for modality in args.modality:
            print(report(run(modality, modes), modality, modes), flush=True)
        return
    if args.child:
        args.rows = args.rows[0]
        child(args)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as tmp:
        work = Path(tmp)
        ctx = prepare(work, sorted(set(args.rows) | set(args.spark_rows)), args.n_train, args.epochs)
        runs = [("local", t, n) for t in args.cpu_threads for n in args.rows]
        runs += [("spark", args.cpu_threads[0], n) for n in args.spark_rows]
        for engine, threads, n in runs:
            cmd = [sys.executable, __file__, "--child", "--rows", str(n), "--batch-size", str(args.batch_size),
                   "--modes", args.modes, "--context", json.dumps(ctx), "--workdir", str(work),
                   "--cpu-threads", str(threads), "--engine", engine, "--spark-master", args.spark_master,
                   "--cores", str(args.cores)]
            if args.profile and engine == "local":
                cmd.append("--profile")
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"benchmark child for {n} rows failed")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(res)
            if args.profile and engine == "local":
                start = out.stderr.find("Ordered by")
                print(out.stderr[start:] if start >= 0 else out.stderr[-6000:], flush=True)
            if engine == "spark":
                same = [r for r in results if r["engine"] == "local" and r["rows"] == n]
                ratio = (f" | {res['stage_rows_per_s'] / same[0]['stage_rows_per_s']:.2f}x the streaming path"
                         if same else "")
                print(f"spark {args.spark_master} | {n:>9,} rows | stage {res['stage_rows_per_s']:>8,.0f} rows/s "
                      f"({res['stage_s']:.1f} s) | explain (executors) "
                      f"{n / res['steps_s']['explain']:>8,.0f} rows/s{ratio} | load {res['load_average'][0]:.1f}",
                      flush=True)
                print(f"    wall s {res['steps_s']}", flush=True)
                continue
            print(f"threads {res['torch_threads']} | {n:>9,} rows | stage {res['stage_rows_per_s']:>8,.0f} rows/s "
                  f"({res['stage_s']:.1f} s), {res['stage_rows_per_cpu_s']:,.0f} rows/CPU-s (CPU "
                  f"{res['stage_cpu_s']:.1f} s), projected idle {res['cores']}-core "
                  f"{res['projected_rows_per_s']:,.0f} rows/s | inference "
                  f"{res['inference_rows_per_s']:>10,.0f} rows/s | ratio {res['ratio_to_inference']:.4f} | "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB (before {res['peak_rss_mb_before_stage']:.0f}) | "
                  f"load {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}", flush=True)
            print(f"    wall s {res['steps_s']}", flush=True)
            print(f"    CPU us/row by step (each in its thread) {res['step_cpu_us_per_row']}", flush=True)
    results_all, results = results, [r for r in results if r["engine"] == "local"]
    for threads in args.cpu_threads:
        mine = [r for r in results if r["torch_threads"] == (threads or r["torch_threads"])]
        if len(mine) > 1:
            small, large = min(mine, key=lambda r: r["rows"]), max(mine, key=lambda r: r["rows"])
            growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
            print(f"memory: peak RSS at {large['rows']:,} rows is {growth:+.1%} of {small['rows']:,} rows "
                  f"({'flat' if growth <= FLAT_WITHIN else 'NOT flat'}: target within {FLAT_WITHIN:.0%})")
    best = max((r for r in results if r["rows"] == max(args.rows)), key=lambda r: r["stage_rows_per_s"])
    verdict = "meets" if best["stage_rows_per_s"] >= TARGET_ROWS_PER_S else "misses"
    projected = "meets" if best["projected_rows_per_s"] >= TARGET_ROWS_PER_S else "misses"
    print(f"target {TARGET_ROWS_PER_S:,} rows/s: {verdict} it at {best['rows']:,} rows "
          f"({best['stage_rows_per_s']:,.0f} rows/s wall at load {best['load_before'][0]:.1f}, modes {args.modes}); "
          f"projected on an idle {best['cores']}-core machine: {best['projected_rows_per_s']:,.0f} rows/s "
          f"({projected} it)")
    if args.json:
        Path(args.json).write_text(json.dumps(results_all, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
