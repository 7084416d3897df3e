"""The stage's background steps (governance.stage.overlap): items keep their order, at most
``depth`` items wait in a queue, an error in a background step reaches the caller, and closing
early stops the threads."""

from __future__ import annotations

import threading
import time

import pytest

from governance.stage.overlap import OrderedWorker, Prefetch


def test_prefetch_yields_every_item_in_order_and_stays_bounded() -> None:
    produced: list[int] = []

    def source():
        for i in range(50):
            produced.append(i)
            yield i

    with Prefetch(source(), depth=2) as it:
        items = iter(it)
        assert next(items) == 0
        time.sleep(0.2)  # let the reader run ahead as far as it may
        # the item handed over, `depth` queued, and the one waiting for room
        assert len(produced) <= 1 + 2 + 1
        assert [0] + list(items) == list(range(50))


def test_prefetch_raises_the_source_error_in_the_consumer() -> None:
    def source():
        yield 1
        raise ValueError("broken row group")

    with Prefetch(source(), depth=2) as it:
        got = []
        with pytest.raises(ValueError, match="broken row group"):
            for x in it:
                got.append(x)
    assert got == [1]


def test_prefetch_closed_early_stops_its_thread() -> None:
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = Prefetch(endless(), depth=2)
    assert next(iter(it)) == 0
    it.close()
    assert threading.active_count() == before


def test_worker_applies_items_in_submission_order() -> None:
    seen: list[int] = []
    worker = OrderedWorker(seen.append, depth=2)
    for i in range(200):
        worker.submit(i)
    worker.close()
    assert seen == list(range(200))


def test_worker_error_reaches_the_caller_and_abort_drops_the_rest() -> None:
    seen: list[int] = []

    def fold(i: int) -> None:
        if i == 3:
            raise RuntimeError("fold failed at 3")
        seen.append(i)

    worker = OrderedWorker(fold, depth=1)
    with pytest.raises(RuntimeError, match="fold failed at 3"):
        for i in range(100):
            worker.submit(i)
        worker.close()
    worker.abort()
    assert seen == [0, 1, 2]


def _returns(fn, within: float = 60.0) -> bool:
    """Whether ``fn()`` returns (a liveness check: a deadlock would never return)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(within)
    return not t.is_alive()


def test_clean_up_survives_a_queue_lock_left_taken(monkeypatch) -> None:
    """A signal raised as an exception in the main thread can land between a queue lock's
    acquire and the block that releases it (the lock stays taken). Closing the reader and
    aborting the worker must still return: they give up on that queue, and the threads behind
    it are daemons that do not keep the process alive."""
    import governance.stage.overlap as overlap

    monkeypatch.setattr(overlap, "_LOCK_WAIT_S", 0.2)

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    reader = Prefetch(endless(), depth=2)
    assert next(iter(reader)) == 0
    reader._queue.mutex.acquire()  # what the interrupted consumer left behind
    assert _returns(reader.close)

    gate = threading.Event()
    worker = OrderedWorker(lambda item: gate.wait(5), depth=2)
    worker.submit(1)
    worker._queue.mutex.acquire()
    assert _returns(worker.abort)
    gate.set()
    assert worker._thread.daemon and reader._thread.daemon


def test_abort_with_a_free_lock_still_waits_for_the_item_in_progress() -> None:
    """Without a stuck lock, abort stops the worker after the item it is folding (nothing is
    left running behind the caller's back)."""
    started, release = threading.Event(), threading.Event()
    done: list[int] = []

    def fold(item: int) -> None:
        started.set()
        release.wait(10)
        done.append(item)

    worker = OrderedWorker(fold, depth=2)
    worker.submit(1)
    worker.submit(2)
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    worker.abort()
    assert done == [1] and not worker._thread.is_alive()
