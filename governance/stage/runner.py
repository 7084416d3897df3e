"""The streaming runner: read a chunk, explain it, fold it into the state, write it, drop it.

The data contract runs at the same time in a background thread over its own reading of the
table (``governance.validation.ContractRun``: long blocks of a few columns, GX's fixed cost per
expectation paid once per block, not per explanation batch). The explanation proceeds
speculatively and stops as soon as the contract sees a failure no later block can undo; nothing
is logged unless the whole contract passes, so a late failure only costs the time spent. Memory
is bounded by a few explanation batches, one contract block and the state (sums and a fixed-size
sample), not by the number of rows. Reading, explaining and folding / writing overlap in three
threads (``explain_stream``), each holding at most ``PIPELINE_DEPTH`` batches.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from governance.data import TableSource
from governance.modality.base import InputBatch, InputNotReadable, Modality, ModalityPlan
from governance.stage.batch import BatchResult, Explainer, explain_batch
from governance.stage.overlap import OrderedWorker, Prefetch
from governance.stage.state import StageSettings, StageState
from governance.stage.writers import SampleWriters, reason_code_table
from governance.validation import DEFAULT_CELL_BUDGET, ContractRun, ValidationOutcome

#: Batches each background step (reading; folding and writing) may hold ahead of the next.
PIPELINE_DEPTH = 2

#: Rows of the probe batch that decides a binary model's threshold (probabilities or logits).
PROBE_ROWS = 256

_freezes = 0
_freeze_lock = threading.Lock()


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Keep the objects alive on entry (modules, the model) out of the garbage collector's scans.

    The engine's explanations and GX's per-block contexts hold large arrays in reference cycles,
    which only a collection frees: without one per batch / block, RSS grows with the number of
    rows. A full collection scans every object (0.24 s with torch, MLflow and GX loaded); after
    ``gc.freeze`` it scans only what the stage made (well under a millisecond). Re-entrant."""
    global _freezes
    with _freeze_lock:
        if _freezes == 0:
            gc.freeze()
        _freezes += 1
    try:
        yield
    finally:
        with _freeze_lock:
            _freezes -= 1
            if _freezes == 0:
                gc.unfreeze()


class PhaseClock:
    """Wall and main-thread CPU seconds per phase (``time.perf_counter`` / ``time.thread_time``)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c

    def timings(self) -> dict[str, float]:
        """``{phase: wall seconds, phase_cpu: CPU seconds}``."""
        out = dict(self.wall)
        out.update({f"{k}_cpu": v for k, v in self.cpu.items()})
        return out


@dataclass
class StreamResult:
    """The contract's outcome and, when explanation ran to the end, the state over every row."""

    outcome: ValidationOutcome
    state: StageState | None
    n_rows: int
    timings: dict[str, float] = field(default_factory=dict)


def _tqdm(total: int | None, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="backtrace", disable=quiet, mininterval=0.5)


def explain_stream(explainer: Explainer, modality: Modality, plan: ModalityPlan, table: TableSource,
                   settings: StageSettings, out_dir: Path | None, *, batch_size: int,
                   dictionary: Mapping[str, str] | None = None, stop=None, quiet: bool = True,
                   clock: PhaseClock | None = None) -> StageState:
    """Explain every batch of ``table`` into a fresh state, streaming per-sample files to
    ``out_dir`` (None: no files). ``stop``: an event that ends the loop early when set.

    Three steps overlap (``governance.stage.overlap``): a background thread reads the next
    batches, this thread explains, and another background thread folds each explained batch
    into the state and writes its per-sample rows, in order. Each step sees the batches in
    reading order, so the state and the files are those of a sequential run."""
    clock = clock or PhaseClock()
    state = StageState.empty(settings, modality.accumulators())
    writers = SampleWriters(out_dir) if out_dir is not None else None
    bar = _tqdm(table.n_rows, quiet)

    def fold(result: BatchResult) -> None:
        with clock.phase("aggregate"):
            state.update(result)
        if writers is not None:
            with clock.phase("write"):
                tables = dict(modality.sample_tables(result, plan))
                tables["reason_codes.parquet"] = reason_code_table(result, dictionary or {})
                writers.write(tables)
        bar.update(len(result))

    def read() -> Iterator[InputBatch]:
        batches = iter(modality.batches(table, plan, batch_size))
        while True:
            with clock.phase("read"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    worker = reader = None
    try:
        with clock.phase("read"):
            probe = next(iter(modality.batches(table, plan, PROBE_ROWS)), None)
        if probe is None:
            return state
        explainer.calibrate(modality, probe)
        reader = Prefetch(read(), depth=PIPELINE_DEPTH)
        worker = OrderedWorker(fold, depth=PIPELINE_DEPTH)
        for batch in reader:
            if stop is not None and stop.is_set():
                break
            with clock.phase("backtrace"):
                result = explain_batch(explainer, modality, plan, batch)
            del batch
            worker.submit(result)
            del result
            gc.collect(1)  # the batch's explanations sit in reference cycles (see frozen_gc)
        worker.close()
    except BaseException:
        if worker is not None:
            worker.abort()
        raise
    finally:
        if reader is not None:
            reader.close()
        bar.close()
        if writers is not None:
            writers.close()
    return state


def run_stream(explainer: Explainer, modality: Modality, plan: ModalityPlan, table: TableSource,
               settings: StageSettings, out_dir: Path, *, batch_size: int,
               dictionary: Mapping[str, str] | None = None, cell_budget: int = DEFAULT_CELL_BUDGET,
               quiet: bool = True, explain: bool = True) -> StreamResult:
    """Check the contract (background thread) and explain the table (this thread) at once.

    Returns the outcome and the state; the state is None when the explanation did not cover
    every row (the contract failed, the data could not become model inputs, or ``explain`` is
    False). An error while explaining is raised only when the contract passed (a contract
    failure explains it otherwise)."""
    with frozen_gc():
        return _run_stream(explainer, modality, plan, table, settings, out_dir, batch_size=batch_size,
                           dictionary=dictionary, cell_budget=cell_budget, quiet=quiet, explain=explain)


def _run_stream(explainer: Explainer, modality: Modality, plan: ModalityPlan, table: TableSource,
                settings: StageSettings, out_dir: Path, *, batch_size: int, dictionary: Mapping[str, str] | None,
                cell_budget: int, quiet: bool, explain: bool) -> StreamResult:
    clock = PhaseClock()
    t0, cpu0 = time.perf_counter(), time.process_time()
    contract = ContractRun(table, plan.expectations, contract_source=plan.contract_source,
                           cell_budget=cell_budget, independent=plan.independent, notes=plan.notes).start()
    state: StageState | None = None
    pending: BaseException | None = None
    readable = explain and set(plan.columns) <= set(table.columns)
    if readable:
        try:
            state = explain_stream(explainer, modality, plan, table, settings, out_dir, batch_size=batch_size,
                                   dictionary=dictionary, stop=contract.failed_early, quiet=quiet, clock=clock)
        except InputNotReadable as exc:
            pending, state = exc, None
        except Exception as exc:  # decided below: a contract failure explains it
            pending, state = exc, None
    with clock.phase("contract_wait"):
        outcome = contract.result()
    if contract.failed_early.is_set() or not outcome.success:
        state = None
    elif pending is not None:
        raise pending
    timings = clock.timings()
    timings.update({"contract": contract.wall_s, "contract_cpu": contract.cpu_s, "stream": time.perf_counter() - t0,
                    "stream_process_cpu": time.process_time() - cpu0})
    return StreamResult(outcome=outcome, state=state, n_rows=outcome.n_rows, timings=timings)
