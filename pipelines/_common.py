"""Shared by the entry-point scripts: the repository root on sys.path and "" -> None."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def opt(value: str | None) -> str | None:
    """MLproject passes "" for an option that was not given."""
    return value if value not in (None, "", "None") else None


def config_path(value: str | None) -> str | None:
    """A config path relative to this folder (where mlflow run starts the scripts) or absolute."""
    v = opt(value)
    if v is None:
        return None
    p = Path(v)
    return str(p if p.is_absolute() or p.exists() else HERE / p)
