"""Shared test set-up: offline, no telemetry; fixtures of the report tests (tests/report_fixtures.py)."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from report_fixtures import governance_store, published, tracking  # noqa: E402,F401
from explain_fixtures import credit_store, credit_store_session  # noqa: E402,F401
