"""The explanation stage's core: one batch -> ``BatchResult``; a mergeable ``StageState``;
documents from a (merged) state; writers; the streaming runner.

    from governance.stage import Explainer, StageSettings, StageState, documents, explain_batch
    result = explain_batch(explainer, modality, plan, input_batch)   # engine, every mode
    state = StageState.empty(settings).update(result)                # sums, counts, a sample
    state.merge(other_state)                                         # any split of the rows
    blob = state.to_bytes(); StageState.from_bytes(blob)             # npz + JSON, no pickle
    docs = documents(state)                                          # global importance, ...

Modules: ``keys`` (randomness keyed by sample id), ``batch`` (explain_batch, BatchResult),
``state`` (StageState and its accumulators), ``documents``, ``writers``, ``runner``. Exports are
resolved lazily so that ``governance.aggregate`` can import ``governance.stage.keys``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BatchResult": "batch", "ModeResult": "batch", "Explainer": "batch", "explain_batch": "batch",
    "StageError": "batch", "ROW_ALIGNMENT": "batch", "torch_threads": "batch",
    "StageState": "state", "StageSettings": "state", "Accumulator": "state", "Reservoir": "state",
    "StageDocuments": "documents", "documents": "documents", "directions": "documents",
    "write_documents": "writers", "write_plots": "writers", "write_json": "writers", "json_safe": "writers",
    "reason_code_table": "writers", "SampleWriters": "writers",
    "run_stream": "runner", "explain_stream": "runner", "StreamResult": "runner", "PhaseClock": "runner",
    "Draws": "keys", "sample_keys": "keys",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"governance.stage.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'governance.stage' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
