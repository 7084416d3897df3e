"""Who is working on something: a process's identity (host, pid, start) and whether it still runs.

The explanation stage records its identity in the folders it creates (``governance.workdirs``)
and on the run it works in (``governance.tracking.claim_run``), so that what a killed process left
behind can be told from what a live one is still using. A pid alone is not enough (pids are
reused, and a reboot starts them again), so the identity also holds the boot id and the process's
start time in clock ticks since boot (Linux ``/proc``); where ``/proc`` is missing, ``start`` is
empty and only the pid is checked.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

ALIVE = "alive"
DEAD = "dead"
UNKNOWN = "unknown"  # another host: its processes cannot be checked from here


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_of(pid: int) -> str:
    """``<boot id>:<start ticks>`` of ``pid`` ("" where ``/proc`` cannot tell)."""
    stat = _read(f"/proc/{pid}/stat")
    boot = _read("/proc/sys/kernel/random/boot_id")
    if not stat or not boot:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return f"{boot}:{fields[19]}" if len(fields) > 19 else ""


@dataclass(frozen=True)
class Owner:
    """A process: the host it runs on, its pid and its start (``<boot id>:<ticks>`` or "")."""

    host: str
    pid: int
    start: str = ""

    @classmethod
    def of(cls, pid: int) -> "Owner":
        """Process ``pid`` of this host."""
        return cls(host=socket.gethostname(), pid=int(pid), start=_start_of(pid))

    @classmethod
    def current(cls) -> "Owner":
        """This process."""
        return cls.of(os.getpid())

    def state(self) -> str:
        """``alive``, ``dead`` or ``unknown`` (another host)."""
        if self.host != socket.gethostname():
            return UNKNOWN
        if self.pid <= 0:
            return DEAD
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return DEAD
        except PermissionError:  # it exists, owned by another user
            pass
        if self.start and self.start != _start_of(self.pid):
            return DEAD  # the pid now belongs to another process (or the host rebooted)
        return ALIVE

    def is_current(self) -> bool:
        """Whether this is the calling process."""
        return self == Owner.current()

    def describe(self) -> str:
        """``pid 123 on host h``."""
        return f"pid {self.pid} on host {self.host}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Owner | None":
        """An owner from ``{"host", "pid", "start"}`` (None when malformed)."""
        try:
            return cls(host=str(data["host"]), pid=int(data["pid"]), start=str(data.get("start") or ""))
        except (KeyError, TypeError, ValueError):
            return None
