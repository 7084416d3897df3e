"""Temporary folders the tool owns: created with a marker naming the process that made them, so
that the folders a killed process left behind are found and removed at the next start.

Every folder is made by :func:`make_owned_dir` in the system temp folder (``TMPDIR`` is honoured)
with a name starting ``governance-`` and a marker file ``.mlflow-governance-owner.json`` holding
the owner (``governance.owner.Owner``). :func:`clean_stale` removes only folders that have all
of: that name, the marker written by this tool, the current user as owner on disk, and an owner
process on this host that no longer runs. Anything else, including a folder whose marker is
missing, unreadable or names a live process, is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from governance.owner import DEAD, Owner

PREFIX = "governance-"
MARKER = ".mlflow-governance-owner.json"
TOOL = "mlflow-governance"


def make_owned_dir(prefix: str = PREFIX) -> Path:
    """A fresh folder in the temp folder, marked as this process's (``prefix`` starts ``governance-``)."""
    if not prefix.startswith(PREFIX):
        raise ValueError(f"owned folders are named {PREFIX}*, got prefix {prefix!r}")
    path = Path(tempfile.mkdtemp(prefix=prefix))
    owner = Owner.current()
    (path / MARKER).write_text(json.dumps({"tool": TOOL, "host": owner.host, "pid": owner.pid,
                                           "start": owner.start}, sort_keys=True))
    return path


def remove_owned(path: Path) -> None:
    """Remove a folder :func:`make_owned_dir` made (and everything in it)."""
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def owned_tempdir(prefix: str = PREFIX) -> Iterator[Path]:
    """:func:`make_owned_dir`, removed on exit."""
    path = make_owned_dir(prefix)
    try:
        yield path
    finally:
        remove_owned(path)


def folder_owner(path: Path) -> Owner | None:
    """The owner recorded in a folder this tool made, None when it is not one (no valid marker)."""
    marker = path / MARKER
    try:
        if marker.is_symlink() or not marker.is_file():
            return None
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return None
    return Owner.from_mapping(data)


def stale_dirs(root: str | Path | None = None) -> list[Path]:
    """Folders under ``root`` (default: the temp folder) this tool made whose process is gone."""
    root = Path(root or tempfile.gettempdir())
    uid = os.getuid() if hasattr(os, "getuid") else None
    found = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        try:
            if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            if uid is not None and entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        owner = folder_owner(Path(entry.path))
        if owner is not None and owner.state() == DEAD:
            found.append(Path(entry.path))
    return sorted(found)


def clean_stale(root: str | Path | None = None) -> list[Path]:
    """Remove :func:`stale_dirs`; returns what was removed."""
    removed = []
    for path in stale_dirs(root):
        remove_owned(path)
        if not path.exists():
            removed.append(path)
    return removed
