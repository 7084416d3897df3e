"""Engine speed: explain() time as a ratio of one forward+backward pass of the same model (issue 14).

For each model and batch, measured in this one run:

* the median time of a forward+backward (gradient x input) pass and of ``Backtrace.explain`` in
  each mode (graph capture excluded: it is cached per input signature), their ratios, and the
  issue's targets with pass/FAIL per cell (timed with ``--clock``, at the first ``--threads``
  count);
* with ``--clock cpu``, each function's CPU time split into user time (the computation) and
  system time with its page faults (fresh memory mapped by the kernel; on a virtual machine
  several microseconds a page, and it falls on whichever call finds its memory given back);
* Captum's LRP (epsilon rule) on the same model and batch, where Captum is installed (the
  ``bench`` extra) and supports the model's layers ("unsupported (...)" otherwise);
* 1 vs 2 intra-op threads (wall clock: CPU time counts every thread, so it cannot show a speed-up):
  explain() with two threads must not be slower than with one;
* every mode in one ``Backtrace.explain_modes`` call (one recording) against the three
  ``explain`` calls (what the explain stage saves);
* fwd+bwd twice, with torch's allocator and inside the engine's memory arena
  (``governance.backtrace.arena``, on CPU where it builds): every ratio is to the faster of the
  two, so the arena the engine runs in is no advantage over the baseline;
* the peak extra memory of each mode (tensor allocations above what exists before the call: the
  profiler's allocation events on CPU, ``max_memory_allocated`` on CUDA), and contrastive over
  default (target <= 2).

    .venv/bin/python benchmarks/engine_speed.py [--only cnn,resnet34,mlp,minilm,llama,mlp8192]
        [--repeats N] [--clock wall|cpu] [--threads 1,2] [--device cpu|cuda] [--no-captum]

``--clock cpu`` (process CPU time; use it on a shared machine) applies to the target table; on
CUDA the clock is the wall clock with synchronisation. ``--only`` also takes the zoo cases of
``zoo_speed.py`` (moe, lstm, unet) and ``mlp8192`` (the MLP at the explain stage's batch; not in
the default set, which is the issue's table).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import (MiniLMClassifier, ResNet34, SmallCNN, paper_mlp, randomise_batch_norm,  # noqa: E402
                    small_llama, token_batch)

from governance.backtrace import Backtrace, arena  # noqa: E402

MODES = ("default", "signed", "contrastive")
ALL_MODES = "explain_modes"  # Backtrace.explain_modes over every mode of a case
IN_ARENA = "fwd+bwd (arena)"  # the baseline with torch's CPU allocator swapped for the engine's arena
BASELINES = ("fwd+bwd", IN_ARENA)
THREAD_NOISE = 0.05  # "not slower": within this fraction (equal speeds measure either way round)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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


def minilm_forward_backward(model, x, task):
    """Gradient of the top class with respect to the word embeddings, times the embeddings."""
    emb = model.encoder.embeddings.word_embeddings(x["input_ids"]).detach().requires_grad_(True)
    y = model(None, x["attention_mask"], inputs_embeds=emb)
    y.gather(-1, y.argmax(-1, keepdim=True)).sum().backward()
    return (emb.grad * emb).sum(-1)


def lm_forward_backward(model, x, task):
    """Gradient of the last position's top logit with respect to the input embeddings."""
    emb = model.get_input_embeddings()(x["input_ids"]).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=x["attention_mask"], use_cache=False).logits[:, -1]
    logits.gather(-1, logits.argmax(-1, keepdim=True)).sum().backward()
    return (emb.grad * emb).sum(-1)


@dataclass
class Case:
    """One benchmark row: a model, an input batch, the task to seed, its baseline and targets."""

    name: str
    build: Callable[[], tuple[torch.nn.Module, object]]
    task: str
    repeats: int = 5
    modes: tuple[str, ...] = MODES
    baseline: Callable[[torch.nn.Module, object, str], object] = forward_backward
    targets: dict[str, float] = field(default_factory=dict)  # mode -> max ratio (issue 14)


@dataclass
class CaseResult:
    """Medians at the first thread count per function ((wall s, cpu s)), wall medians per thread
    count, peak extra MiB, Captum's LRP (its medians, or why it does not apply)."""

    case: Case
    times: dict[str, tuple[float, float]]
    threads: dict[int, dict[str, tuple[float, float]]]
    mem: dict[str, float]
    captum: str | None = None
    # medians of (user s, system s, minor page faults) per call at the first thread count
    split: dict[str, tuple[float, float, float]] = field(default_factory=dict)


# --- measuring ---------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu",
          split: dict[str, tuple[float, float, float]] | None = None) -> dict[str, tuple[float, float]]:
    """Median (wall, cpu) seconds of each function after one warm-up call each (graph capture,
    allocator); the functions are interleaved per repeat so load changes hit them alike.
    ``split``, when given, receives each function's median user seconds, system seconds and
    minor page faults per call (the process's, from ``getrusage``).

    Each timed call directly follows an untimed call of the same function: it finds the memory
    the allocator holds as a loop over batches leaves it (a training loop's fwd+bwd, the explain
    stage's calls). Timed right after a different function, a call pays for mapping again the
    pages that function gave back, and on a virtual machine whose host reclaims freed pages that
    cost (several microseconds per 4 KiB page) depended more on the order of the calls than on
    the function: the same contrastive explain measured 2.3x or 5.3x fwd+bwd."""
    for fn in fns.values():
        fn()
    _sync(device)
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    usage: dict[str, list[tuple[float, float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            fn()
            _sync(device)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            w, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            walls[k].append(time.perf_counter() - w)
            cpus[k].append(time.process_time() - c)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            usage[k].append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
    if split is not None:
        split.update({k: tuple(statistics.median(u[i] for u in usage[k]) for i in range(3)) for k in fns})
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def thread_times(fns: dict[str, Callable[[], object]], threads: tuple[int, ...], repeats: int,
                 device: str = "cpu") -> dict[int, dict[str, tuple[float, float]]]:
    """(median, min) wall seconds of each function at each intra-op thread count. Each function
    is timed alone (not interleaved with the others: a multi-threaded call leaves worker threads
    spinning that would slow the next one down), the thread counts alternating per repeat. The
    minimum shows the speed without interference from other jobs on a shared machine."""
    out: dict[int, dict[str, tuple[float, float]]] = {n: {} for n in threads}
    for k, fn in fns.items():
        walls: dict[int, list[float]] = {n: [] for n in threads}
        for n in threads:
            torch.set_num_threads(n)
            fn()
        for _ in range(repeats):
            for n in threads:
                torch.set_num_threads(n)
                _sync(device)
                w = time.perf_counter()
                fn()
                _sync(device)
                walls[n].append(time.perf_counter() - w)
        for n in threads:
            out[n][k] = (statistics.median(walls[n]), min(walls[n]))
    return out


def peak_extra_mib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak of the tensor memory allocated while ``fn`` runs, above what was allocated before
    (MiB): CUDA's allocator statistics, or on CPU the running sum of the profiler's allocation
    and free events (independent of how the C allocator caches or returns pages)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


# --- Captum's LRP ------------------------------------------------------------------------------

def captum_lrp(model: torch.nn.Module, x: object, task: str) -> Callable[[], object] | str:
    """Captum's LRP (epsilon rule on linear and convolution layers, its defaults) as a
    function, or why it does not apply. Element-wise activations without a Captum rule
    (sigmoid, tanh, GELU, ...) pass relevance through (IdentityRule, the LRP convention)."""
    try:
        from captum.attr import LRP
        from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
        from captum.attr._utils.lrp_rules import IdentityRule
    except ImportError:
        return "not installed"
    if isinstance(x, dict):
        return "unsupported (dict inputs: token ids through embeddings)"
    identity = (torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.GELU, torch.nn.SiLU, torch.nn.Softmax)
    known = tuple(SUPPORTED_LAYERS_WITH_RULES) + tuple(SUPPORTED_NON_LINEAR_LAYERS)
    passing = []
    for m in model.modules():
        if list(m.children()) or isinstance(m, known):
            continue
        if not isinstance(m, identity):
            return f"unsupported ({type(m).__name__})"
        passing.append(m)
    lrp = LRP(model)
    with torch.no_grad():
        y = model(x)
    target = y.argmax(-1) if task == "multiclass-classification" else None

    def run() -> object:
        for m in passing:  # Captum removes the rules it finds after each call
            m.rule = IdentityRule()
        return lrp.attribute(x, target=target)

    try:
        run()
    except Exception as e:  # noqa: BLE001  (Captum's own limits, reported as such)
        return f"unsupported ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
    return run


# --- one case ------------------------------------------------------------------------------------

def run_case(case: Case, repeats: int | None = None, threads: tuple[int, ...] = (1,), device: str = "cpu",
             captum: bool = True, memory: bool = True) -> CaseResult:
    """Time the baseline, every mode and Captum's LRP (interleaved per repeat) at the first
    thread count, then each function at every thread count, and measure the peak extra memory."""
    torch.manual_seed(0)
    model, x = case.build()
    model.eval()
    if device != "cpu":
        model = model.to(device)
        x = {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
    bt = Backtrace(model)
    fns = {"fwd+bwd": lambda: case.baseline(model, x, case.task)}
    if device == "cpu" and arena.available():
        fns[IN_ARENA] = lambda: _in_arena(lambda: case.baseline(model, x, case.task))
    for mode in case.modes:
        fns[mode] = (lambda m: lambda: bt.explain(x, mode=m, task=case.task))(mode)
    if len(case.modes) > 1 and hasattr(bt, "explain_modes"):  # the stage's call (engines since issue 14b)
        fns[ALL_MODES] = lambda: bt.explain_modes(x, modes=case.modes, task=case.task)
    lrp = captum_lrp(model, x, case.task) if captum else None
    if callable(lrp):
        fns["captum"] = lrp
    reps = repeats or case.repeats
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads[0])
        split: dict[str, tuple[float, float, float]] = {}
        times = timed(fns, reps, device, split)
        mem = {k: peak_extra_mib(fn, device) for k, fn in fns.items() if k != "captum"} if memory else {}
        per_thread = thread_times(fns, threads, reps, device) if len(threads) > 1 else {}
    finally:
        torch.set_num_threads(old)
    return CaseResult(case, times, per_thread, mem, None if callable(lrp) else lrp, split)


def _in_arena(fn: Callable[[], object]) -> object:
    """``fn`` with torch's CPU allocator swapped for the arena (kept by the baseline's holder)."""
    arena.hold(_in_arena)
    with arena.scope():
        return fn()


def baseline(times: dict[str, tuple[float, ...]], i: int) -> float:
    """The faster fwd+bwd (torch's allocator or the arena) on clock ``i`` of ``times``' tuples."""
    return min(times[k][i] for k in BASELINES if k in times)


# --- the cases of issue 14 -------------------------------------------------------------------

def _mlp():
    return paper_mlp(), torch.randn(1024, 78)


def _mlp_stage():
    return paper_mlp(), torch.randn(8192, 78)


def _cnn():
    return randomise_batch_norm(SmallCNN()), torch.randn(256, 3, 32, 32)


def _resnet34():
    return randomise_batch_norm(ResNet34()), torch.randn(16, 3, 224, 224)


def _minilm():
    model = MiniLMClassifier().eval()
    ids, mask = token_batch(8, 128, 30000, 32, low=1000)
    ids[:, 0] = 101
    return model, {"input_ids": ids, "attention_mask": mask}


def _llama():
    ids = torch.randint(3, 1000, (2, 256), generator=torch.Generator().manual_seed(1))
    return small_llama(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


CASES: dict[str, Case] = {
    "cnn": Case("CNN+BN+residual 3x32x32, batch 256", _cnn, "multiclass-classification", repeats=5,
                targets={"default": 1.4, "contrastive": 2.5}),
    "resnet34": Case("ResNet-34 shape 3x224x224, batch 16", _resnet34, "multiclass-classification", repeats=3,
                     targets={"default": 1.4, "contrastive": 2.5}),
    "mlp": Case("MLP 78-39-19-1, batch 1024", _mlp, "binary-classification", repeats=40,
                targets={"default": 2.0, "contrastive": 3.5}),
    "mlp8192": Case("MLP 78-39-19-1, batch 8192 (the stage's batch)", _mlp_stage, "binary-classification",
                    repeats=15, targets={"default": 2.0, "contrastive": 3.5}),
    "minilm": Case("MiniLM-L6 + head, 8 x 128 tokens", _minilm, "multiclass-classification", repeats=5,
                   baseline=minilm_forward_backward, targets={"default": 1.5, "contrastive": 3.0}),
    "llama": Case("LLaMA 4L h256 GQA, 2 x 256 tokens", _llama, "generation", repeats=5,
                  baseline=lm_forward_backward, targets={"default": 1.5, "contrastive": 3.0}),
}
ZOO_KEYS = ("moe", "lstm", "unet")


def case_for(key: str) -> Case:
    if key in CASES:
        return CASES[key]
    if key in ZOO_KEYS:
        import zoo_speed

        return zoo_speed.CASES[key]
    raise SystemExit(f"unknown case {key!r}; choose from {', '.join([*CASES, *ZOO_KEYS])}")


# --- tables ----------------------------------------------------------------------------------------

def _cell(ratio: float, target: float | None) -> str:
    if target is None:
        return f"{ratio:.2f}"
    return f"{ratio:.2f} {'pass' if ratio <= target else 'FAIL'} (<= {target:g})"


def report(results: list[CaseResult], clock: str, threads: int = 1) -> str:
    """The issue's tables: ratios against targets, threads, memory."""
    ci = 0 if clock == "wall" else 1
    lines = [f"Ratios to forward+backward ({clock} clock, {threads} thread(s), median):", "",
             "| model | fwd+bwd (ms) | fwd+bwd in the arena (ms) | default | signed | contrastive | Captum LRP-eps |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r.times
        base = baseline(t, ci)
        cells = [_cell(t[m][ci] / base, r.case.targets.get(m)) if m in t else "-" for m in MODES]
        cap = f"{t['captum'][ci] / base:.2f}" if "captum" in t else (r.captum or "-")
        own = f"{t[IN_ARENA][ci] * 1000:.1f}" if IN_ARENA in t else "-"
        lines.append(f"| {r.case.name} | {t['fwd+bwd'][ci] * 1000:.1f} | {own} | " + " | ".join(cells) + f" | {cap} |")
    lines += ["", "(ratios to the faster fwd+bwd of the two; the arena: "
              + ("on" if arena.available() else "off or not built here") + ")"]
    split = [r for r in results if r.split]
    if split and clock == "cpu":
        lines += ["", "Where the CPU time goes (medians per call of the calls above: user and system "
                  "seconds, minor page faults). System time is mostly the kernel handing out fresh pages: "
                  "each tensor too big for the C allocator's free lists is a new mapping whose pages fault "
                  "on first touch, and which calls find their pages already held depends on what ran "
                  "before them; user time is the computation:", "",
                  "| model | function | user (ms) | system (ms) | page faults | user ratio to fwd+bwd |",
                  "|---|---|---|---|---|---|"]
        for r in split:
            base = baseline(r.split, 0)
            for k, (user, system, faults) in r.split.items():
                name = {"captum": "Captum LRP"}.get(k, k)
                lines.append(f"| {r.case.name} | {name} | {user * 1000:.1f} | {system * 1000:.1f} | "
                             f"{faults:.0f} | {'-' if k in BASELINES else f'{user / base:.2f}'} |")
    together = [r for r in results if ALL_MODES in r.times]
    if together:
        lines += ["", "Every mode over one recording (``explain_modes``) against one ``explain`` call per "
                  f"mode ({clock} clock, ms; ratio < 1: the forward passes saved):", "",
                  "| model | explain() per mode, summed | explain_modes | ratio | ratio to fwd+bwd |",
                  "|---|---|---|---|---|"]
        for r in together:
            t = r.times
            summed = sum(t[m][ci] for m in r.case.modes)
            one = t[ALL_MODES][ci]
            lines.append(f"| {r.case.name} | {summed * 1000:.1f} | {one * 1000:.1f} | {one / summed:.2f} | "
                         f"{one / baseline(t, ci):.2f} |")
    multi = [r for r in results if r.threads]
    if multi:
        ns = list(multi[0].threads)
        lines += ["", "Threads (wall clock ms, median / min, (median ratio to fwd+bwd at that thread count); each "
                  "function timed alone; explain() with two threads must not be slower than with one, beyond "
                  f"{THREAD_NOISE:.0%} of measurement noise):", "",
                  "| model | function | " + " | ".join(f"{n} thread(s)" for n in ns) + " | median verdict | min verdict |",
                  "|---|---|" + "---|" * (len(ns) + 2)]
        for r in multi:
            for k in r.threads[ns[0]]:
                ws = [r.threads[n][k] for n in ns]
                verdicts = []
                for i in (0, 1):
                    ok = all(b[i] <= a[i] * (1 + THREAD_NOISE) for a, b in zip(ws, ws[1:]))
                    verdicts.append(("pass" if ok else "FAIL (slower)") if k in MODES else "(reference)")
                name = {"captum": "Captum LRP"}.get(k, k)
                bases = [baseline(r.threads[n], 0) for n in ns]
                cells = [f"{w[0] * 1000:.1f} / {w[1] * 1000:.1f}" + ("" if k in BASELINES else f" ({w[0] / b:.2f}x)")
                         for w, b in zip(ws, bases)]
                lines.append(f"| {r.case.name} | {name} | " + " | ".join(cells) + f" | {verdicts[0]} | {verdicts[1]} |")
    with_mem = [r for r in results if r.mem]
    if with_mem:
        lines += ["", "Peak extra memory (MiB of tensors allocated above the level before the call; "
                  "contrastive / default <= 2):", "",
                  "| model | fwd+bwd | default | signed | contrastive | explain_modes (all) | contrastive / default |",
                  "|---|---|---|---|---|---|---|"]
        for r in with_mem:
            m = r.mem
            ratio = m["contrastive"] / m["default"] if m.get("default") and "contrastive" in m else float("nan")
            verdict = "pass" if ratio <= 2.0 else "FAIL"
            lines.append(f"| {r.case.name} | " + " | ".join(f"{m[k]:.1f}" if k in m else "-" for k in ("fwd+bwd", *MODES, ALL_MODES))
                         + f" | {ratio:.2f} {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[CaseResult]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(k for k in CASES if k != "mlp8192"),
                    help="comma-separated subset of: " + ", ".join([*CASES, *ZOO_KEYS]))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="clock of the target table: 'cpu' (process CPU time) resists a shared, busy machine")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts, the first for the target table")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--no-captum", action="store_true", help="skip Captum's LRP")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = ap.parse_args(argv)
    threads = tuple(int(v) for v in args.threads.split(","))
    clock = "wall" if args.device == "cuda" else args.clock
    if args.device == "cuda":
        threads = threads[:1]  # intra-op CPU threads do not apply to the GPU kernels
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
    print(f"torch {torch.__version__}, device {args.device}, threads {threads}, {clock} clock for the target table", flush=True)
    results = []
    for key in args.only.split(","):
        r = run_case(case_for(key.strip()), args.repeats, threads, args.device, captum=not args.no_captum,
                     memory=not args.no_memory)
        results.append(r)
        print(report([r], clock, threads[0]).splitlines()[4], flush=True)
    print()
    print(report(results, clock, threads[0]))
    return results


if __name__ == "__main__":
    main()
