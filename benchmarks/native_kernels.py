"""The compiled loops against the torch / numpy code they replace, measured in one run.

* ``explain`` (default and contrastive) on the issue-14 models with the compiled loops (contrastive
  routing, the residual add's split) and with the torch code (``GOVERNANCE_NATIVE=0``), each as a
  ratio to one forward+backward of the same batch;
* the add rule's split of one (256, 32, 32, 32) residual, compiled and torch, in milliseconds;
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


def explain_rows(keys_: list[str], repeats: int | None) -> list[str]:
    out = ["| model | fwd+bwd (ms) | mode | compiled loops | torch code | compiled / torch |",
           "|---|---|---|---|---|---|"]
    for key in keys_:
        case = case_for(key)
        torch.manual_seed(0)
        model, x = case.build()
        model.eval()
        bt = Backtrace(model)
        fns = {"fb": _switch(True, lambda: case.baseline(model, x, case.task))}
        for mode in ("default", "contrastive"):
            explain = (lambda m: lambda: bt.explain(x, mode=m, task=case.task))(mode)
            fns[(mode, "on")], fns[(mode, "off")] = _switch(True, explain), _switch(False, explain)
        m = medians(fns, repeats or case.repeats)
        for mode in ("default", "contrastive"):
            on, off = m[(mode, "on")], m[(mode, "off")]
            out.append(f"| {case.name} | {m['fb'] * 1e3:.1f} | {mode} | {on / m['fb']:.2f} | {off / m['fb']:.2f} "
                       f"| {on / off:.2f} |")
    return out


def share_rows(repeats: int) -> list[str]:
    from governance.backtrace.context import safe_div

    g = torch.Generator().manual_seed(0)
    R, a, b = (torch.randn(256, 32, 32, 32, generator=g) for _ in range(3))

    def plain() -> object:
        ma, mb = a.abs(), b.abs()
        s = safe_div(R, ma + mb)
        return s * ma, s.mul_(mb)

    def fused() -> object:
        out = native.share(R, a, b)
        assert out is not None, "the compiled split ran"
        return out

    m = medians({"on": _switch(True, fused), "off": _switch(False, plain)}, repeats)
    return ["| residual add split, (256, 32, 32, 32) float32 | compiled ms | torch ms | torch / compiled |",
            "|---|---|---|---|",
            f"| one map | {m['on'] * 1e3:.1f} | {m['off'] * 1e3:.1f} | {m['off'] / m['on']:.1f} |"]


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
    if native.library(native._SOURCE, native._SIGNATURES) is None:
        print("no compiled kernels here (no C compiler, or GOVERNANCE_NATIVE=0): nothing to compare")
        return
    print(f"torch {torch.__version__}, CPU clock, 1 thread, medians")
    print()
    print("\n".join(explain_rows(args.only.split(","), args.repeats)))
    print()
    print("\n".join(share_rows(args.repeats or 20)))
    print()
    print("\n".join(weight_rows(args.repeats or 50)))


if __name__ == "__main__":
    main()
