"""Turn a termination signal into an exception, so that a killed stage still cleans up.

Python's default for SIGTERM and SIGHUP is to die on the spot: no ``finally`` runs, the staging
folders stay and the run stays RUNNING. Inside :func:`interruptible`, SIGTERM, SIGHUP and SIGINT
raise :class:`Interrupted` in the main thread instead; the stage's ``except``/``finally`` then tag
the run ``governance.status=failed``, end a run it created as FAILED and remove its folders. A
second signal while that clean-up runs ends the process the default way (what is left is
cleaned at the next start, see ``governance.workdirs``). A handler someone else installed is
left alone, and nothing changes outside the main thread (Python delivers signals only there).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

#: Exit status of a process ended by a signal, as shells report it.
SIGNAL_EXIT_BASE = 128


class Interrupted(BaseException):
    """The process received a termination signal while the stage was working (not an
    ``Exception``: nothing that handles ordinary errors swallows it)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.run_id: str | None = None  # the run the stage was working in (set by the stage)
        super().__init__(f"interrupted by {self.name}")

    @property
    def name(self) -> str:
        """``SIGTERM``, ``SIGINT``, ..."""
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return SIGNAL_EXIT_BASE + self.signum


def _catchable() -> dict[int, Any]:
    """The signals we take over, with the default handler we may replace."""
    out: dict[int, Any] = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    if hasattr(signal, "SIGHUP"):
        out[signal.SIGHUP] = signal.SIG_DFL
    return out


class _State:
    depth = 0
    saved: dict[int, Any] = {}
    received: int | None = None


def _handler(signum: int, frame: Any) -> None:
    if _State.received is not None:  # a second signal: stop cleaning up, die the default way
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _State.received = signum
    raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """While inside, SIGTERM / SIGINT / SIGHUP raise :class:`Interrupted` (re-entrant)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _State.depth == 0:
        _State.received = None
        _State.saved = {}
        for signum, default in _catchable().items():
            current = signal.getsignal(signum)
            if current == default:
                _State.saved[signum] = current
                signal.signal(signum, _handler)
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0:
            for signum, previous in _State.saved.items():
                signal.signal(signum, previous)
            _State.saved = {}
