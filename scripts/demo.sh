#!/usr/bin/env bash
# Set up (if needed), then run the main job on the bundled credit-risk example:
# train -> data contract -> DLBacktrace explanation -> audit report, model card and manifest,
# all logged to the local MLflow store (sqlite:///mlflow.db, artifacts in ./mlruns).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$(pwd)/mlflow.db}"
export PATH="$(pwd)/.venv/bin:$PATH"
mlflow run pipelines --env-manager local --experiment-name credit-risk-governance "$@"
echo
echo "Done. Browse the runs with:  .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI"
echo "The audit report, model card and manifest are under the explain run's artifacts: governance/"
