"""The compiled loops against the torch / numpy code they replace, measured in one run.

* contrastive ``explain`` on the issue-14 models with the compiled routing and with the torch
  routing (``GOVERNANCE_NATIVE=0``), each as a ratio to one forward+backward of the same batch;
* the stage's Poisson(1) bootstrap weights (200 replicates) for one 8192-row batch, compiled and
  numpy, in CPU microseconds per row.

Calls are interleaved per repeat so that load changes hit both alike; medians, CPU clock, one
intra-op thread.

    .venv/bin/python benchmarks/native_kernels.py [--only mlp,mlp8192,cnn] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_speed import case_for, timed  # noqa: E402

from governance.backtrace import Backtrace, native  # noqa: E402
from governance.stage import keys  # noqa: E402


def _switch(on: bool, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ["GOVERNANCE_NATIVE"] = "1" if on else "0"
        return fn()
    return run


def medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds of each function (``engine_speed.timed``: warmed up, interleaved)."""
    return {k: cpu for k, (_wall, cpu) in timed(fns, repeats).items()}


def routing_rows(keys_: list[str], repeats: int | None) -> list[str]:
    out = ["| model | fwd+bwd (ms) | contrastive, compiled routing | contrastive, torch routing | compiled / torch |",
           "|---|---|---|---|---|"]
    for key in keys_:
        case = case_for(key)
        torch.manual_seed(0)
        model, x = case.build()
        model.eval()
        bt = Backtrace(model)
        explain = lambda: bt.explain(x, mode="contrastive", task=case.task)  # noqa: E731
        m = medians({"fb": _switch(True, lambda: case.baseline(model, x, case.task)),
                     "on": _switch(True, explain), "off": _switch(False, explain)}, repeats or case.repeats)
        out.append(f"| {case.name} | {m['fb'] * 1e3:.1f} | {m['on'] / m['fb']:.2f} | {m['off'] / m['fb']:.2f} "
                   f"| {m['on'] / m['off']:.2f} |")
    return out


def weight_rows(repeats: int) -> list[str]:
    n = 8192
    k = keys.sample_keys(np.arange(n))
    draw = lambda: keys.poisson_weights(k, 0, 200)  # noqa: E731
    m = medians({"on": _switch(True, draw), "off": _switch(False, draw)}, repeats)
    return ["| bootstrap weights, 200 replicates | compiled µs/row | numpy µs/row | numpy / compiled |",
            "|---|---|---|---|",
            f"| 8192-row batch | {m['on'] / n * 1e6:.2f} | {m['off'] / n * 1e6:.2f} | {m['off'] / m['on']:.1f} |"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="mlp,mlp8192,cnn")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if native.library(native._SOURCE, native._ROUTE_SIGNATURES) is None:
        print("no compiled kernels here (no C compiler, or GOVERNANCE_NATIVE=0): nothing to compare")
        return
    print(f"torch {torch.__version__}, CPU clock, 1 thread, medians")
    print()
    print("\n".join(routing_rows(args.only.split(","), args.repeats)))
    print()
    print("\n".join(weight_rows(args.repeats or 50)))


if __name__ == "__main__":
    main()
