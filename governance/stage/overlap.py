"""Bounded background threads that let the stage's steps overlap on several cores.

The streaming runner reads the next batch, explains the current one and folds / writes the
previous one at the same time: the engine (torch), the reader (pyarrow) and the accumulators'
products and the parquet writer (numpy, torch, pyarrow) release the GIL for their heavy work.
Each background step is one thread that takes items in order, so the results are exactly those
of running the steps one after the other; its queue holds at most ``depth`` items, so memory
stays bounded by a few batches whatever the number of rows. An error in a background step is
raised in the caller at its next hand-over (or at ``close``); closing early stops the threads.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_S = 0.1
#: How long a clean-up waits for a queue's lock. A signal turned into an exception in the main
#: thread (``governance.signals``) can land between a lock's acquire and the block that releases
#: it, leaving the lock taken for good; clean-up then gives up on that queue instead of waiting
#: forever, and leaves the thread behind it (a daemon: it does not keep the process alive).
_LOCK_WAIT_S = 5.0


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: "queue.Queue[Any]", item: Any, stop: threading.Event) -> bool:
    """Put ``item``, waiting for room unless ``stop`` is set; False when stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _drain(q: "queue.Queue[Any]") -> bool:
    """Drop whatever ``q`` holds and wake a producer waiting for room. False, with nothing done,
    when the queue's lock stays taken (see ``_LOCK_WAIT_S``)."""
    if not q.mutex.acquire(timeout=_LOCK_WAIT_S):
        return False
    try:
        q.queue.clear()
        q.not_full.notify_all()
    finally:
        q.mutex.release()
    return True


def _join(thread: threading.Thread, drained: bool) -> None:
    """Wait for ``thread``: until it ends when its queue could be drained (it then stops after
    its current item), else only briefly (it may be stuck on the queue's abandoned lock)."""
    thread.join(None if drained else _LOCK_WAIT_S)


class Prefetch(Generic[T]):
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead of the consumer."""

    def __init__(self, source: Iterable[T], depth: int = 2, name: str = "governance-read") -> None:
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._source = source
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                if not _put(self._queue, item, self._stop):
                    return
            _put(self._queue, _DONE, self._stop)
        except BaseException as exc:  # handed to the consumer
            _put(self._queue, _Failure(exc), self._stop)

    def __iter__(self) -> Iterator[T]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        """Stop the background thread (it finishes the item it is reading) and wait for it."""
        self._stop.set()
        _join(self._thread, _drain(self._queue))  # the drain unblocks a producer waiting for room

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OrderedWorker(Generic[T]):
    """Apply ``fn`` to submitted items one at a time, in submission order, in a background
    thread; ``submit`` waits while ``depth`` items are pending."""

    def __init__(self, fn: Callable[[T], None], depth: int = 2, name: str = "governance-fold") -> None:
        self._fn = fn
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                self._fn(item)
                del item
        except BaseException as exc:  # raised in the caller by submit / close
            self._error = exc
            self._stop.set()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: T) -> None:
        """Queue ``item`` (waits for room); raises the worker's error if it failed."""
        self._check()
        if not _put(self._queue, item, self._stop):
            self._check()
            raise RuntimeError("the background worker stopped")

    def close(self) -> None:
        """Process what is queued, stop the thread and raise its error if any."""
        if self._thread.is_alive() and not self._stop.is_set():
            _put(self._queue, _DONE, self._stop)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        """Stop without processing what is still queued (after an error elsewhere)."""
        self._stop.set()
        drained = _drain(self._queue)
        if drained and self._thread.is_alive():
            try:
                self._queue.put_nowait(_DONE)
            except queue.Full:
                pass
        _join(self._thread, drained)
