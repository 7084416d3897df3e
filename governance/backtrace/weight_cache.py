"""Tensors derived from a model's parameters (|W|, 2W⁺, 2|W⁻|, their stacks) kept across
explain() calls, so each is computed once per weight rather than once per layer per call.

An entry is valid for one parameter object at one version: an in-place update (an optimiser
step, ``copy_``, loading a state dict) bumps the parameter's version counter, and assigning
``.data`` changes its storage, so a changed weight is never read stale. Only ``nn.Parameter``
values are cached (a folded batch norm's weight is a fresh tensor each call), only when
autograd is off, and only up to ``BUDGET_BYTES`` in all (beyond it, values are computed per
call). Entries go when their parameter is freed.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch

#: the most bytes of derived tensors kept at once
BUDGET_BYTES = 512 << 20

_lock = threading.Lock()
_entries: dict[int, tuple[weakref.ref, tuple, dict[object, torch.Tensor]]] = {}
_used = 0


def _stamp(w: torch.Tensor) -> tuple:
    return (w._version, w.data_ptr(), tuple(w.shape), w.dtype, w.device)


def _size(table: dict[object, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in table.values())


def _forget(key: int) -> None:
    global _used
    with _lock:
        entry = _entries.pop(key, None)
        if entry is not None:
            _used -= _size(entry[2])


def derived(w: torch.Tensor, key: object, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(w)``, computed once per parameter version and ``key`` (the same values as calling
    ``make(w)``: it is called on the same tensor)."""
    global _used
    if not isinstance(w, torch.nn.Parameter) or torch.is_grad_enabled():
        return make(w)
    stamp = _stamp(w)
    with _lock:
        entry = _entries.get(id(w))
        if entry is not None and (entry[0]() is not w or entry[1] != stamp):
            _used -= _size(entry[2])
            entry = None
        if entry is None:
            ident = id(w)
            entry = (weakref.ref(w, lambda _ref: _forget(ident)), stamp, {})
            _entries[ident] = entry
        hit = entry[2].get(key)
    if hit is not None:
        return hit
    value = make(w)
    nbytes = value.numel() * value.element_size()
    with _lock:
        if _entries.get(id(w)) is entry and _used + nbytes <= BUDGET_BYTES:
            entry[2][key] = value
            _used += nbytes
    return value


def clear() -> None:
    """Drop every entry (tests; freeing memory)."""
    global _used
    with _lock:
        _entries.clear()
        _used = 0
