"""Engine speed: explain() time as a ratio of one forward+backward pass of the same model.

For each model and batch, measured in this one run: the median time of a forward+backward
(gradient x input) pass, of ``Backtrace.explain`` in each mode (graph capture excluded: it is
cached per input signature), their ratios, and the peak extra memory of each (VmHWM reset via
/proc/self/clear_refs, so the figure is the resident-set high-water mark above the resting
level). Targets (issue 2): default <= 2x, contrastive <= 4x.

    .venv/bin/python benchmarks/engine_speed.py [--only mlp,cnn,resnet34] [--repeats 5]
        [--clock wall|cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import ResNet34, SmallCNN, paper_mlp, randomise_batch_norm  # noqa: E402

from governance.backtrace import Backtrace  # noqa: E402

MODES = ("default", "signed", "contrastive")


@dataclass
class Case:
    """One benchmark row: a model, an input batch and the task to seed."""

    name: str
    build: Callable[[], tuple[torch.nn.Module, object]]
    task: str
    repeats: int = 5
    modes: tuple[str, ...] = MODES


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """Resident-set high-water mark above the resting level while ``fn`` runs (MiB)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    rest = _rss_kib("VmRSS")
    out = fn()
    peak = _rss_kib("VmHWM")
    del out
    return (peak - rest) / 1024


def forward_backward(model: torch.nn.Module, x: object, task: str) -> object:
    """Gradient x input: one forward and one backward pass of the explained output."""
    if isinstance(x, dict):
        raise TypeError("dict inputs need a case-specific baseline")
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    y = model(x)
    y = y.logits if hasattr(y, "logits") else y
    if task == "multiclass-classification":
        score = y.gather(-1, y.argmax(-1, keepdim=True)).sum()
    else:
        score = y.sum()
    score.backward()
    return x.grad * x


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def timed(fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float] | None = None) -> dict[str, float]:
    """Median time of each function after one warm-up call each (graph capture, allocator);
    the functions are interleaved per repeat so load changes hit them alike."""
    clock = clock or CLOCK
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run_case(case: Case, repeats: int | None = None,
             baseline: Callable[[torch.nn.Module, object, str], object] = forward_backward,
             clock: Callable[[], float] | None = None) -> dict:
    """Time and measure one case: the baseline and every mode, interleaved per repeat."""
    torch.manual_seed(0)
    model, x = case.build()
    model.eval()
    bt = Backtrace(model)
    fns = {"fwd+bwd": lambda: baseline(model, x, case.task)}
    for mode in case.modes:
        fns[mode] = (lambda m: lambda: bt.explain(x, mode=m, task=case.task))(mode)
    med = timed(fns, repeats or case.repeats, clock)
    mem = {k: peak_extra_mib(fn) for k, fn in fns.items()}
    return {"case": case.name, "time": med, "mem": mem}


def report(rows: list[dict]) -> str:
    head = "| model | fwd+bwd (ms) | " + " | ".join(f"{m} (x)" for m in MODES) + " | peak extra MiB: fwd+bwd / " + " / ".join(MODES) + " |"
    lines = [head, "|" + "---|" * (3 + len(MODES))]
    for r in rows:
        base = r["time"]["fwd+bwd"]
        ratios = " | ".join(f"{r['time'][m] / base:.2f}" if m in r["time"] else "-" for m in MODES)
        mems = " / ".join(f"{r['mem'][k]:.0f}" for k in ["fwd+bwd", *MODES] if k in r["mem"])
        lines.append(f"| {r['case']} | {base * 1000:.1f} | {ratios} | {mems} |")
    return "\n".join(lines)


def _mlp():
    return paper_mlp(), torch.randn(1024, 78)


def _cnn():
    return randomise_batch_norm(SmallCNN()), torch.randn(256, 3, 32, 32)


def _resnet34():
    return randomise_batch_norm(ResNet34()), torch.randn(16, 3, 224, 224)


CASES: list[Case] = [
    Case("mlp 78-39-19-1, batch 1024", _mlp, "binary-classification", repeats=20),
    Case("cnn 3x32x32 BN+residual, batch 256", _cnn, "multiclass-classification", repeats=3),
    Case("resnet-34 shape 3x224x224, batch 16", _resnet34, "multiclass-classification", repeats=2),
]
KEYS = {"mlp": 0, "cnn": 1, "resnet34": 2}


# --- issue 3, recurrent / mixture-of-experts / vision half: the cases live in zoo_speed.py
# (MoE causal LM, LSTM next-word model, U-Net), each with its own forward+backward baseline.
ZOO_KEYS = ("moe", "lstm", "unet")


def zoo_case(key: str) -> tuple[Case, Callable]:
    """(case, baseline) of a zoo benchmark: ``--only moe`` (or lstm, unet) runs it here too."""
    import zoo_speed

    return zoo_speed.CASES[key]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(KEYS),
                    help="comma-separated subset of: " + ", ".join([*KEYS, *ZOO_KEYS]))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="'cpu' (process CPU time, best with --threads 1) resists a shared, busy machine")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock")
    rows = []
    for key in args.only.split(","):
        if key.strip() in ZOO_KEYS:
            case, baseline = zoo_case(key.strip())
            rows.append(run_case(case, args.repeats, baseline=baseline))
            print(report(rows[-1:]).splitlines()[-1], flush=True)
            continue
        case = CASES[KEYS[key.strip()]]
        rows.append(run_case(case, args.repeats))
        print(report(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(report(rows))


if __name__ == "__main__":
    main()
